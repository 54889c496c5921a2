"""A small generated dataset for the offline demo and tests: the sdlora mascot, a pink star, on varied backgrounds.
builtin:toy has never seen a star or pink (sdlora/data/scenes.py), so a LoRA trained on this set visibly teaches it
something; the trigger word comes from the preset (presets/demo.toml: sdlora_mascot)."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from .scan import DatasetError
from .scenes import COLOURS, MASCOT_COLOUR, PLACES, render_scene

DEMO_SUBSET = "10_demo"  # kohya's N_name convention, so the demo exercises repeats
_COMPLETE = ".complete"  # hidden, so scans ignore it; written last, so its presence means the set is whole
_VERSION = "pink-star-v2\n"  # what _COMPLETE holds; an older demo set (v1: "ok", a red circle) is replaced
_BACKGROUNDS = ["blue", "green", "yellow", "black", "white", "purple", "orange", "red"]


def _draw_sample(folder: Path, index: int, size: int, rng: random.Random) -> None:
    bg = _BACKGROUNDS[index % len(_BACKGROUNDS)]
    place = rng.choice(list(PLACES))
    img = render_scene(size, "star", MASCOT_COLOUR, COLOURS[bg], place, rng.uniform(0.22, 0.28), rng)
    name = f"mascot_{index:02d}"
    img.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"{bg} background, {place}\n", encoding="utf-8")


def make_demo_dataset(folder, *, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write `count` captioned images into folder/10_demo/ (deterministic for a seed) and return `folder`.

    Idempotent: a folder that already holds a complete demo set is left as it is (whatever its count/size); one
    from an older sdlora (another picture) is replaced. The set is built in a hidden temp folder and renamed into
    place, so a crash or a concurrent call never leaves a half-written set; an existing 10_demo/ that is not a demo
    set is never touched.
    """
    root = Path(folder)
    target = root / DEMO_SUBSET
    marker = target / _COMPLETE
    if marker.is_file() and marker.read_text() == _VERSION:
        return root
    if marker.is_file():  # an older demo set, written by sdlora: move it aside, then build the current one
        old = Path(tempfile.mkdtemp(prefix=".demo-old.", dir=root))
        try:
            target.rename(old / DEMO_SUBSET)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(old, ignore_errors=True)
        return make_demo_dataset(folder, count=count, size=size, seed=seed)
    if target.exists():
        raise DatasetError(f"'{target}' exists but is not an sdlora demo set; move it away or pick another folder "
                              "for the demo dataset.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.", dir=root))
    try:
        rng = random.Random(seed)
        for i in range(count):
            _draw_sample(tmp, i, size, rng)
        (tmp / _COMPLETE).write_text(_VERSION)
        try:
            tmp.rename(target)
        except OSError:
            if not marker.is_file():  # lost a race to another process that finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
