"""Where sdlora keeps its own files, and the built-in names (builtin:demo) that resolve to them."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_DATA = "builtin:demo"
# the generated demo datasets (sdlora/data/demo.py) and their folders in the cache
BUILTIN_DATA = {DEMO_DATA: "demo_data", "builtin:demo-navy": "demo_navy_data"}


def cache_dir() -> Path:
    """$SDLORA_CACHE, else ~/.cache/sdlora: the tiny model, the demo dataset."""
    root = os.environ.get("SDLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sdlora"


def builtin_data_dirs() -> list[Path]:
    """Where the built-in datasets are (or will be) generated."""
    return [cache_dir() / folder for folder in BUILTIN_DATA.values()]


def resolve_data_dir(spec: str) -> Path:
    """`builtin:demo` (or another built-in name) -> that generated dataset (made on first use); anything else is a
    folder path."""
    name = spec.strip()
    if name in BUILTIN_DATA:
        from .data.demo import make_demo_dataset

        return Path(make_demo_dataset(cache_dir() / BUILTIN_DATA[name], which=name))
    return Path(spec).expanduser()
