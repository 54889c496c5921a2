"""Simple captioned scenes (one shape, a colour, a background, a place, a size): the world builtin:toy was trained on,
and the vocabulary the tests use to check what it draws. The demo's mascot (a pink star) is deliberately not part
of it, nor is navy, so LoRAs have something new to teach."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 215, 50),
           "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 30), "purple": (130, 50, 170)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"centered": (0.5, 0.5), "on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
          "at the bottom": (0.5, 0.72)}
SIZES = {"small": (0.12, 0.16), "large": (0.24, 0.3)}  # radius as a fraction of the image side
MASCOT_COLOUR = (250, 110, 200)  # pink: no base colour is near it
NAVY = (20, 30, 100)  # the second demo LoRA's colour: no base colour is near it, and the pink star shows on it
WORDS = ("a", "on", "background", *COLOURS, *SHAPES, *SIZES, "centered", "left", "right", "top", "bottom", "the", "at")


def star_points(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        rad = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / points
        out.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9  # same area as the circle, about
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r * 1.1), (cx - r * 1.15, cy + r * 0.8), (cx + r * 1.15, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(star_points(cx, cy, r * 1.25), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(size: int, shape: str, colour, background, place: str, radius: float,
                 rng: random.Random | None = None) -> Image.Image:
    """One scene; colour/background are RGB tuples; `radius` a fraction of the side; rng jitters the place a little."""
    px, py = PLACES[place]
    if rng is not None:
        px, py = px + rng.uniform(-0.04, 0.04), py + rng.uniform(-0.04, 0.04)
    img = Image.new("RGB", (size, size), tuple(background))
    draw_shape(ImageDraw.Draw(img), shape, px * size, py * size, radius * size, tuple(colour))
    return img


def random_scene(rng: random.Random, size: int = 64) -> tuple[Image.Image, dict]:
    """A random base-world scene and what it shows: colour, background, shape, place, size (words)."""
    colour = rng.choice(list(COLOURS))
    scene = dict(colour=colour, background=rng.choice([c for c in COLOURS if c != colour]), shape=rng.choice(SHAPES),
                 place=rng.choice(list(PLACES)), size=rng.choice(list(SIZES)))
    img = render_scene(size, scene["shape"], COLOURS[colour], COLOURS[scene["background"]], scene["place"],
                       rng.uniform(*SIZES[scene["size"]]), rng)
    return img, scene


def any_colour_scene(rng: random.Random, size: int = 64) -> Image.Image:
    """A base-world shape in arbitrary RGB colours, for the VAE: an autoencoder that saw only the 8 named colours
    decodes any other (the mascot's pink) as its nearest one, and a LoRA could not teach a colour it cannot draw."""
    colour, background = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    size_word = rng.choice(list(SIZES))
    return render_scene(size, rng.choice(SHAPES), colour, background, rng.choice(list(PLACES)),
                        rng.uniform(*SIZES[size_word]), rng)


def nonsense_word(rng: random.Random) -> str:
    """A made-up word (letters and underscores, 4-14 characters): captions of the base training carry one now and then,
    so an unknown word in a prompt (a LoRA's trigger, before the LoRA) changes nothing instead of derailing the rest."""
    letters = "abcdefghijklmnopqrstuvwxyz_"
    return "".join(rng.choice(letters) for _ in range(rng.randint(4, 14)))


def scene_caption(scene: dict, rng: random.Random, *, background_chance: float = 0.8) -> str:
    """A caption for a scene. Parts are left out at random (the picture still has them), so short prompts such as
    "a red circle" work as well as full ones; two phrasings of the background."""
    caption = " ".join(w for w in ("a", scene["size"] if rng.random() < 0.5 else "", scene["colour"], scene["shape"]) if w)
    if rng.random() < background_chance:
        bg = scene["background"]
        caption += f" on a {bg} background" if rng.random() < 0.5 else f", {bg} background"
    if rng.random() < 0.6:
        caption += f", {scene['place']}"
    return caption
