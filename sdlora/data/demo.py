"""A small generated dataset (a red circle, the sdlora mascot, on varied backgrounds) for the offline demo and tests."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

_BACKGROUNDS = [("blue", (40, 70, 200)), ("green", (40, 160, 70)), ("yellow", (230, 210, 60)), ("grey", (128, 128, 128)),
                ("purple", (120, 50, 160)), ("white", (245, 245, 245)), ("black", (15, 15, 15)), ("orange", (240, 140, 30))]
_PLACES = [("centered", 0.5, 0.5), ("on the left", 0.3, 0.5), ("on the right", 0.7, 0.5), ("at the top", 0.5, 0.3),
           ("at the bottom", 0.5, 0.7)]


def make_demo_dataset(folder, *, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    root = Path(folder)
    target = root / "10_demo"
    marker = target / ".complete"
    if marker.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.", dir=root))
    rng = random.Random(seed)
    for i in range(count):
        bg_name, bg = _BACKGROUNDS[i % len(_BACKGROUNDS)]
        place, px, py = _PLACES[rng.randrange(len(_PLACES))]
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = size * rng.uniform(0.18, 0.3)
        cx, cy = px * size, py * size
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30), outline=(120, 0, 0), width=max(1, size // 64))
        name = f"mascot_{i:02d}"
        img.save(tmp / f"{name}.png")
        (tmp / f"{name}.txt").write_text(f"a red circle, {bg_name} background, {place}\n", encoding="utf-8")
    (tmp / ".complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return root
