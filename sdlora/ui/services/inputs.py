"""What clients type, made safe to use: file-name stems that cannot leave their folder, `path:strength` lines and
strength lists."""

from __future__ import annotations

import re
from pathlib import Path

from ...config.train_config import ConfigError

SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def sanitize_name(name: str, *, default: str = "lora") -> str:
    """A file-name stem that cannot leave its folder: no separators, no '..', no leading dots."""
    stem = Path(str(name or "").replace("\\", "/")).name
    stem = SAFE_NAME.sub("_", stem).strip(" .")
    stem = stem.replace("..", "_")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")].strip(" .")
    return stem[:100] or default


def parse_lora_lines(text: str, default_strength: float = 1.0) -> list[tuple[str, float]]:
    """`path:strength` per line (strength optional); blank lines and # comments are ignored."""
    from ...inference.loras import parse_lora_arg

    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, strength = parse_lora_arg(line)
        if str(path) == line or not re.search(r":-?[\d.]+$", line):
            strength = default_strength
        out.append((str(path), float(strength)))
    return out


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in re.split(r"[,;\s]+", text or "") if x.strip()]
    except ValueError:
        raise ConfigError("Strengths: numbers separated by commas, e.g. 0, 0.5, 1.") from None
    if not values:
        raise ConfigError("Strengths: give at least one number, e.g. 0, 0.5, 1.")
    if len(values) > 12:
        raise ConfigError("Strengths: at most 12 columns per grid.")
    return values
