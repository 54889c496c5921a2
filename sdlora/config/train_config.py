"""One validated training configuration, TOML presets, and errors that name the field at fault.

TrainConfig is the sections in sdlora/config/sections/ put together: one flat model (`cfg.rank`, `cfg.lr`), whose
fields, checks and command-line flags each section declares. Rules that span sections are checked here."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, get_args

import tomli_w
from pydantic import ConfigDict, ValidationError, model_validator

from ..adapters.rules import check_adapter_settings
from ..fileio import atomic_write_text
from .errors import ConfigError
from .sections import SECTIONS
from .sections.adapter import TARGET_SHORTHANDS
from .sections.optimisation import MAX_SEED
from .sections.output import OUTPUT_NAME_RE

__all__ = ["MAX_SEED", "OUTPUT_NAME_RE", "TARGET_SHORTHANDS", "ConfigError", "TrainConfig", "config_from_preset",
           "field_choices", "format_validation_error", "load_preset", "make_config", "parse_set_value", "save_preset"]


# pydantic orders the fields of several bases from the last base to the first: reversed, they keep SECTIONS' order.
class TrainConfig(*reversed(SECTIONS)):
    """Everything a training run needs. Unknown keys are refused so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="after")
    def _adapter_rules(self) -> "TrainConfig":
        # The adapter rules read the adapter, LoRA+ and file-format settings together.
        check_adapter_settings(self)
        return self


def field_choices(name: str) -> list[str]:
    """The values a setting of fixed choices accepts, in order: the one list the CLI, the UI and the importer use."""
    return list(get_args(TrainConfig.model_fields[name].annotation))


def format_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's error list into sentences that name each field."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = loc or "config"
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            known = ", ".join(sorted(TrainConfig.model_fields))
            msg = f"unknown setting (known settings: {known})"
        elif "input" in err and err.get("type") not in ("missing",) and loc:  # a cross-field rule names its fields itself
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{field}: {msg}")
    return "Invalid configuration — " + "; ".join(lines)


def make_config(**values: Any) -> TrainConfig:
    """Build a TrainConfig, raising ConfigError with field names instead of pydantic's dump."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    from ..fileio import UserFileError, read_user_bytes
    from ..safetext import shown

    path = Path(path).expanduser()
    shown_path = shown(path)
    try:
        try:
            raw = read_user_bytes(path)
        except UserFileError as exc:
            if exc.kind == "folder":
                raise ConfigError(f"Preset '{shown_path}' is a folder; give a .toml file (see presets/).") from None
            if exc.kind == "special":
                raise ConfigError(f"Preset '{shown_path}' is not a regular file (a device, pipe or socket); give a .toml file.") from None
            raise ConfigError(f"Preset '{shown_path}' is {exc.size:,} bytes: far too large for a settings file. Give a .toml preset.") from None
        if b"\x00" in raw:
            raise ConfigError(f"Preset '{shown_path}' is a binary file, not a TOML text file. Give a .toml preset.")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Preset '{shown_path}' not found. Check the path, or pick one from presets/.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Preset '{shown_path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Preset '{shown_path}' is not valid TOML: {exc}. Fix the file and try again.") from None
    except RecursionError:
        raise ConfigError(f"Preset '{shown_path}' is nested too deeply to be a preset.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read preset '{shown_path}': {exc.strerror or exc}.") from None
    # Presets may group settings in tables ([lora], [training], ...): flatten them.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key in flat:
                    raise ConfigError(f"Preset '{path}': setting '{sub_key}' appears twice.")
                flat[sub_key] = sub_value
        else:
            if key in flat:
                raise ConfigError(f"Preset '{path}': setting '{key}' appears twice.")
            flat[key] = value
    return flat


def config_from_preset(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values = load_preset(path)
    values.update(overrides or {})
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"Preset '{path}': " + format_validation_error(exc)) from None


def save_preset(config: TrainConfig, path: str | os.PathLike, *, header: str = "") -> Path:
    """Write the config as a flat TOML preset, atomically (temp file + rename)."""
    path = Path(path).expanduser()
    data = {k: v for k, v in config.model_dump().items() if v is not None and k != "resume"}
    body = tomli_w.dumps(data)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + body
    atomic_write_text(path, text)
    return path


def parse_set_value(raw: str) -> Any:
    """`--set key=value` values are TOML literals when they parse as such, else plain strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
