"""Where sdlora keeps its own files, and the built-in names (builtin:demo) that resolve to them."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_DATA = "builtin:demo"


def cache_dir() -> Path:
    """$SDLORA_CACHE, else ~/.cache/sdlora: the tiny model, the demo dataset."""
    root = os.environ.get("SDLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sdlora"


def resolve_data_dir(spec: str) -> Path:
    """`builtin:demo` -> the generated demo dataset (made on first use); anything else is a folder path."""
    if spec.strip() == DEMO_DATA:
        from .data.demo import make_demo_dataset

        return Path(make_demo_dataset(cache_dir() / "demo_data"))
    return Path(spec).expanduser()
