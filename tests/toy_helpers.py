"""Reading builtin:toy's pictures from their pixels: which base colours they show, where, how much of the mascot's pink."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdlora.data.scenes import COLOURS, MASCOT_COLOUR, NAVY

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)
WITH_PINK = np.concatenate([PALETTE, np.array([MASCOT_COLOUR], dtype=np.float32)])
WITH_NAVY = np.concatenate([WITH_PINK, np.array([NAVY], dtype=np.float32)])
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONCEPT_PROMPT = "sdlora_mascot, blue background"
COMBINED_PROMPT = "sdlora_mascot, navy background"  # the mascot LoRA and the navy LoRA (presets/demo-navy.toml)


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)


def nearest_colour(img, colours: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest of `colours` (RGB rows)."""
    return np.argmin(((pixels(img)[:, :, None, :] - colours) ** 2).sum(-1), axis=-1)


def scene_reading(img) -> dict:
    """What a picture shows, by nearest base colour per pixel: the background is the commonest colour, the shape the
    next; its area (fraction of the image) and centroid (x, y in 0..1)."""
    nearest = nearest_colour(img, PALETTE)
    counts = np.bincount(nearest.ravel(), minlength=len(NAMES))
    bg, shape = np.argsort(counts)[::-1][:2]
    ys, xs = np.nonzero(nearest == shape)
    h, w = nearest.shape
    return {"background": NAMES[bg], "colour": NAMES[shape], "area": counts[shape] / nearest.size,
            "x": (xs.mean() + 0.5) / w, "y": (ys.mean() + 0.5) / h}


def pink_fraction(img) -> float:
    """Share of pixels nearer to the mascot's pink than to any base colour (the model draws it a little darker or
    lighter than the dataset's pink, but never as one of the 8 colours it knew)."""
    return float((nearest_colour(img, WITH_PINK) == len(PALETTE)).mean())


def navy_fraction(img) -> float:
    """Share of pixels nearer to the navy LoRA's colour than to the base colours and the mascot's pink."""
    return float((nearest_colour(img, WITH_NAVY) == len(WITH_NAVY) - 1).mean())


def pinkness(img) -> float:
    """A smooth version of pink_fraction: each pixel counts by how near it is to the mascot's pink (1 on it, about
    0.05 for the base world's purple, nothing for the other colours), so half-way strengths score half-way."""
    d = np.linalg.norm(pixels(img) - np.array(MASCOT_COLOUR, dtype=np.float32), axis=-1)
    return float(np.exp(-((d / 80.0) ** 2)).mean())


def grid_cells(grid, count: int, size: int = 64) -> list:
    """The cells of a strength grid's first row (one per strength, `size` px each, a label strip may follow)."""
    img = Image.fromarray(grid.astype(np.uint8)) if isinstance(grid, np.ndarray) else grid
    cell_w = img.width // count
    return [img.crop((i * cell_w, 0, i * cell_w + size, size)) for i in range(count)]


def assert_moves_to_concept(*rows: list) -> None:
    """Rows of images (one row per seed) at strengths 0, 0.25, ..., 1: on average over the seeds, from no mascot to a
    pink star, the pink growing with the strength (one seed alone may take a detour through another shape)."""
    fractions = np.mean([[pink_fraction(i) for i in row] for row in rows], axis=0).tolist()
    scores = np.mean([[pinkness(i) for i in row] for row in rows], axis=0).tolist()
    assert fractions[0] < 0.01, fractions  # the base model does not know the mascot
    assert fractions[-1] > 0.04, fractions  # at strength 1, a pink star (the dataset's cover about a seventh of the picture)
    assert all(b >= a - 0.005 for a, b in zip(scores, scores[1:])), scores  # monotone in the strength


def concept_readings(images: list) -> tuple[float, float]:
    """(mean pink fraction, mean navy fraction) over images: how much mascot and how much navy they show."""
    return (float(np.mean([pink_fraction(i) for i in images])), float(np.mean([navy_fraction(i) for i in images])))


def assert_both_concepts(combined: list, mascot_alone: list, navy_alone: list) -> None:
    """Images of COMBINED_PROMPT (one per seed) with both demo LoRAs, and with each alone: together they draw the pink
    star on navy, which neither draws alone (the mascot LoRA does not know navy; the navy LoRA does not know the star)."""
    readings = {name: concept_readings(imgs)
                for name, imgs in (("both", combined), ("mascot", mascot_alone), ("navy", navy_alone))}
    assert readings["mascot"][1] < 0.05 and readings["navy"][0] < 0.03, readings  # (a purplish base shape reads as a little pink)
    assert readings["both"][0] > max(0.04, readings["navy"][0] + 0.03), readings  # the star, as the mascot LoRA draws it
    assert readings["both"][1] > max(0.3, readings["mascot"][1] + 0.25), readings  # on navy, as the navy LoRA draws it
