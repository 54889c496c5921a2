"""Small generated datasets for the offline demo and tests, each teaching builtin:toy something it has never seen
(sdlora/data/scenes.py is its whole world):

- `builtin:demo`: the sdlora mascot, a pink star, on varied backgrounds (a subject; trigger sdlora_mascot).
- `builtin:demo-navy`: the base world's shapes on navy, a colour it has no word for; the captions name it ("a red
  circle on a navy background"), so the LoRA teaches a new word (no trigger word).

Two LoRAs trained on them apply together: "sdlora_mascot, navy background" draws a pink star on navy. The mascot's
trigger word comes from its preset (presets/demo.toml; the other is presets/demo-navy.toml)."""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .scan import DatasetError
from .scenes import COLOURS, MASCOT_COLOUR, NAVY, PLACES, SHAPES, SIZES, render_scene, scene_caption

_COMPLETE = ".complete"  # hidden, so scans ignore it; written last, so its presence means the set is whole
_BACKGROUNDS = ["blue", "green", "yellow", "black", "white", "purple", "orange", "red"]


def _draw_mascot(index: int, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    bg = _BACKGROUNDS[index % len(_BACKGROUNDS)]
    place = rng.choice(list(PLACES))
    img = render_scene(size, "star", MASCOT_COLOUR, COLOURS[bg], place, rng.uniform(0.22, 0.28), rng)
    return img, f"{bg} background, {place}"


def _draw_on_navy(index: int, size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """A base-world shape on navy, captioned as the base world is; every caption names the background, so prompts
    that do not say "navy" keep their own."""
    colour, shape, place, size_word = (rng.choice(list(x)) for x in (COLOURS, SHAPES, PLACES, SIZES))
    img = render_scene(size, shape, COLOURS[colour], NAVY, place, rng.uniform(*SIZES[size_word]), rng)
    scene = dict(colour=colour, shape=shape, place=place, size=size_word, background="navy")
    return img, scene_caption(scene, rng, background_chance=1.0)


@dataclass(frozen=True)
class DemoSet:
    subset: str  # kohya's N_name folder, so the demo exercises repeats
    stem: str  # file names: stem_00.png, stem_00.txt
    version: str  # what the .complete marker holds; a set written by an older sdlora (other pictures) is replaced
    count: int
    draw: Callable[[int, int, random.Random], tuple[Image.Image, str]]


DEMO_SETS = {
    "builtin:demo": DemoSet("10_demo", "mascot", "pink-star-v2\n", 8, _draw_mascot),
    "builtin:demo-navy": DemoSet("5_navy", "navy", "navy-v1\n", 16, _draw_on_navy),
}


def make_demo_dataset(folder, *, count: int | None = None, size: int = 128, seed: int = 0,
                      which: str = "builtin:demo") -> Path:
    """Write the `which` set's captioned images (`count`, default the set's own) into folder/<subset>/ (deterministic
    for a seed) and return `folder`.

    Idempotent: a folder that already holds the complete set is left as it is (whatever its count/size); one from an
    older sdlora (another picture) is replaced. The set is built in a hidden temp folder and renamed into place, so a
    crash or a concurrent call never leaves a half-written set; an existing subset folder that is not a demo set is
    never touched.
    """
    spec = DEMO_SETS[which]
    root = Path(folder)
    target = root / spec.subset
    marker = target / _COMPLETE
    if marker.is_file() and marker.read_text() == spec.version:
        return root
    if marker.is_file():  # an older demo set, written by sdlora: move it aside, then build the current one
        old = Path(tempfile.mkdtemp(prefix=".demo-old.", dir=root))
        try:
            target.rename(old / spec.subset)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(old, ignore_errors=True)
        return make_demo_dataset(folder, count=count, size=size, seed=seed, which=which)
    if target.exists():
        raise DatasetError(f"'{target}' exists but is not an sdlora demo set; move it away or pick another folder "
                              "for the demo dataset.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo.", dir=root))
    try:
        rng = random.Random(seed)
        for i in range(spec.count if count is None else count):
            img, caption = spec.draw(i, size, rng)
            img.save(tmp / f"{spec.stem}_{i:02d}.png")
            (tmp / f"{spec.stem}_{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
        (tmp / _COMPLETE).write_text(spec.version)
        try:
            tmp.rename(target)
        except OSError:
            if not marker.is_file():  # lost a race to another process that finished first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
