"""Aspect-ratio buckets (kohya-style): sizes of about resolution² area in fixed steps, batches from one bucket."""

from __future__ import annotations

import math
import random


def make_buckets(resolution: int, *, step: int = 64, min_size: int = 256, max_size: int = 1024) -> list[tuple[int, int]]:
    if resolution < 256:  # tiny models: finer steps so small resolutions still get several buckets
        step = 8
    min_size = min(min_size, resolution // 2 if resolution < 256 else min_size, resolution)
    max_size = max(max_size, resolution)
    area = resolution * resolution
    buckets = set()
    w = min_size
    # Widths up to the square side, heights maximal for the area; the transposes give the tall buckets.
    while w <= resolution:
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def bucket_batches(keys: list[tuple[int, int]], batch_size: int, *, rng: random.Random, drop_last: bool = False) -> list[list[int]]:
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(tuple(k), []).append(i)
    batches = []
    for k in sorted(by_key):
        idx = by_key[k][:]
        rng.shuffle(idx)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            if len(chunk) < batch_size and drop_last:
                continue
            batches.append(chunk)
    rng.shuffle(batches)
    return batches
