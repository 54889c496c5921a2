"""A small generated dataset (a red circle, the sdlora mascot, on varied backgrounds) for the offline demo and tests."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from .scan import DatasetError

DEMO_SUBSET = "10_demo"  # kohya's N_name convention, so the demo exercises repeats
_COMPLETE = ".complete"  # hidden, so scans ignore it; written last, so its presence means the set is whole
_BACKGROUNDS = [("blue", (40, 70, 200)), ("green", (40, 160, 70)), ("yellow", (230, 210, 60)), ("grey", (128, 128, 128)),
                ("purple", (120, 50, 160)), ("white", (245, 245, 245)), ("black", (15, 15, 15)), ("orange", (240, 140, 30))]
_PLACES = [("centered", 0.5, 0.5), ("on the left", 0.3, 0.5), ("on the right", 0.7, 0.5), ("at the top", 0.5, 0.3),
           ("at the bottom", 0.5, 0.7)]


def _draw_sample(folder: Path, index: int, size: int, rng: random.Random) -> None:
    bg_name, bg = _BACKGROUNDS[index % len(_BACKGROUNDS)]
    place, px, py = _PLACES[rng.randrange(len(_PLACES))]
    img = Image.new("RGB", (size, size), bg)
    r = size * rng.uniform(0.18, 0.3)
    cx, cy = px * size, py * size
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30), outline=(120, 0, 0),
                                width=max(1, size // 64))
    name = f"mascot_{index:02d}"
    img.save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"a red circle, {bg_name} background, {place}\n", encoding="utf-8")


def make_demo_dataset(folder, *, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write `count` captioned images into folder/10_demo/ (deterministic for a seed) and return `folder`.

    Idempotent: a folder that already holds a complete demo set is left as it is (whatever its count/size). The
    set is built in a hidden temp folder and renamed into place, so a crash or a concurrent call never leaves a
    half-written set; an existing 10_demo/ that is not a demo set is never touched.
    """
    root = Path(folder)
    target = root / DEMO_SUBSET
    if (target / _COMPLETE).is_file():
        return root
    if target.exists():
        raise DatasetError(f"'{target}' exists but is not an sdlora demo set; move it away or pick another folder "
                              "for the demo dataset.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.", dir=root))
    try:
        rng = random.Random(seed)
        for i in range(count):
            _draw_sample(tmp, i, size, rng)
        (tmp / _COMPLETE).write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # lost a race to another process that finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
