"""Seeded random draws for the data: each generator is keyed by what it is for (epoch order, a sample's crop, flip or
caption, the validation split), so a resumed run draws exactly what an uninterrupted run would have drawn."""

from __future__ import annotations

import hashlib
import random


def seeded_rng(*key) -> random.Random:
    """A generator that depends on `key` only (its repr, hashed): the same key gives the same draws in every run."""
    return random.Random(hashlib.sha256(repr(key).encode()).digest())


def sample_rng(seed: int, purpose: str, epoch: int, index: int) -> random.Random:
    """The generator of one sample's `purpose` ("crop", "flip", "caption") in one epoch. Pixels, mask and SDXL size
    conditioning each take a fresh one for "crop", so all three see the same crop."""
    return seeded_rng(seed, purpose, epoch, index)
