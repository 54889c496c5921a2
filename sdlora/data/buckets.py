"""Aspect-ratio buckets (kohya-style): sizes of about resolution² area in fixed steps, batches from one bucket.

Training every image at its own aspect ratio (instead of centre-cropping everything square) keeps heads and
feet in the picture; batches must come from a single bucket because a batch tensor has one shape.
"""

from __future__ import annotations

import math
import random


def bucket_step(resolution: int) -> int:
    """64 px, kohya's step; 8 px below resolution 256 so tiny test models still get several buckets."""
    return 8 if resolution < 256 else 64


def make_buckets(resolution: int, *, step: int = 64, min_size: int | None = None, max_size: int | None = None) -> list[tuple[int, int]]:
    """All maximal (w, h) buckets: w and h multiples of `step` within [min_size, max_size], w*h <= resolution².

    min_size/max_size default to resolution/2 and 2*resolution (kohya's 256/1024 at 512). Below resolution 256 the
    step drops to 8 so tiny test models still get several buckets. Sorted; includes the square bucket.
    """
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 pixels, not {resolution}.")
    step = min(step, bucket_step(resolution))
    side = max(step, resolution // step * step)
    min_size = min(side, max(step, -(-(min_size or resolution // 2) // step) * step))  # round up, at most the square side
    max_size = max(side, (max_size or 2 * resolution) // step * step)
    area = resolution * resolution
    buckets = {(side, side)}
    # The narrow side walks up to the square side; the long side is as large as the area allows. Transposes give
    # the tall buckets.
    for w in range(min_size, side + 1, step):
        h = min(max_size, area // w // step * step)
        buckets.add((w, h))
        buckets.add((h, w))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (distance of log ratios); ties go to the larger area."""
    target = math.log(max(1, width) / max(1, height))
    return tuple(min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1])))


def own_size_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """kohya's "no upscale" bucket: the image's own size, shrunk (aspect kept) only if it is larger than resolution²,
    then each side rounded down to the bucket step. Every side is at most the image's, so nothing is upscaled."""
    step = bucket_step(resolution)
    w, h = max(1, width), max(1, height)
    if w * h > resolution * resolution:
        scale = math.sqrt(resolution * resolution / (w * h))
        w, h = w * scale, h * scale
    return max(step, int(w) // step * step), max(step, int(h) // step * step)


def bucket_batches(keys: list[tuple[int, int]], batch_size: int, *, rng: random.Random, drop_last: bool = False) -> list[list[int]]:
    """Indices grouped into batches that each hold one bucket's samples; order shuffled by `rng` (deterministic).

    The last batch of a bucket may be short unless drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}.")
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(tuple(k), []).append(i)
    batches = []
    for k in sorted(by_key):
        idx = by_key[k]
        rng.shuffle(idx)
        batches += [idx[s: s + batch_size] for s in range(0, len(idx), batch_size)
                    if not drop_last or s + batch_size <= len(idx)]
    rng.shuffle(batches)
    return batches
