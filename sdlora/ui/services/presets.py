"""Presets in the server's presets folder: list, load, and save the form's settings (never over a preset that ships
with sdlora or was written outside the web UI)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ...config.train_config import ConfigError, make_config, save_preset
from ...fileio import UserFileError, read_user_head
from .configs import ConfigService
from .inputs import sanitize_name

WEB_UI_PRESET = "saved from the sdlora web UI"


def saved_from_web_ui(path: Path) -> bool:
    try:  # a pipe or device named like a preset is refused, never waited on
        head = read_user_head(path, 4 * 400)  # 400 characters of UTF-8 at most
    except (OSError, UserFileError):
        return False
    return WEB_UI_PRESET in io.TextIOWrapper(io.BytesIO(head), encoding="utf-8", errors="replace").readline(400)


class PresetService:
    def __init__(self, presets_dir: Path, configs: ConfigService):
        self.presets_dir = presets_dir
        self.configs = configs

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.presets_dir.glob("*.toml"))

    def load(self, name: str) -> dict[str, Any]:
        from ...config.train_config import load_preset

        path = self.presets_dir / f"{sanitize_name(name, default='demo')}.toml"
        values = load_preset(path)
        return make_config(**values).model_dump()

    def save(self, name: str, values: dict[str, Any]) -> Path:
        if not (name or "").strip():
            raise ConfigError("Preset name: type a name for the preset first, e.g. my-style.")
        cfg = self.configs.build(values)
        # A preset is also read by the command line, which trusts it: it gets the same checks as a run.
        self.configs.check_access(cfg)
        stem = sanitize_name(name, default="my-preset")
        path = self.presets_dir / f"{stem}.toml"
        if path.exists() and not saved_from_web_ui(path):
            raise ConfigError(f"Preset name: '{stem}' ships with sdlora or was written outside the web UI; save under "
                              "another name.")
        return save_preset(cfg, path, header=f"{stem}: {WEB_UI_PRESET}")
