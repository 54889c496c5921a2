"""Aspect-ratio buckets: shape of the bucket list, assignment by aspect ratio, one-bucket batches."""

from __future__ import annotations

import random

import pytest

from sdlora.data import assign_bucket, bucket_batches, make_buckets


@pytest.mark.parametrize("resolution, step, min_size, max_size", [
    (512, 64, 256, 1024), (768, 64, 384, 1536), (1024, 64, 512, 2048), (64, 8, 32, 128), (128, 8, 64, 256), (200, 8, 96, 400),
])
def test_bucket_properties(resolution, step, min_size, max_size):
    buckets = make_buckets(resolution)
    assert buckets == sorted(set(buckets))
    side = resolution // step * step
    assert (side, side) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0, (w, h)
        assert w * h <= resolution * resolution
        assert min_size <= min(w, h) and max(w, h) <= max_size
        # maximal: the long side cannot grow by a step without leaving the area or the size range
        long_side = max(w, h)
        assert long_side + step > max_size or min(w, h) * (long_side + step) > resolution * resolution
        assert (h, w) in buckets  # both orientations
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)


def test_512_matches_kohya():
    wide = [(512, 512), (576, 448), (640, 384), (768, 320), (1024, 256)]
    assert make_buckets(512) == sorted(set(wide + [(h, w) for w, h in wide]))


def test_explicit_limits_are_clamped_to_the_resolution():
    assert make_buckets(64, min_size=256, max_size=32) == [(64, 64)]  # min cannot exceed, max cannot undercut the square
    assert all(min(b) >= 320 for b in make_buckets(512, min_size=300))  # rounded up to the step
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(4)


@pytest.mark.parametrize("size, expect", [((2000, 1000), "wide"), ((1000, 2000), "tall"), ((777, 777), "square"),
                                          ((5000, 100), "widest"), ((1, 1), "square")])
def test_assignment_by_aspect_ratio(size, expect):
    buckets = make_buckets(512)
    w, h = assign_bucket(*size, buckets)
    if expect == "wide":
        assert w > h and 1.5 < w / h < 2.6
    elif expect == "tall":
        assert h > w and 1.5 < h / w < 2.6
    elif expect == "square":
        assert (w, h) == (512, 512)
    else:
        assert (w, h) == (1024, 256)


def test_assignment_tie_goes_to_the_larger_area():
    assert assign_bucket(100, 100, [(64, 64), (128, 128), (96, 64)]) == (128, 128)
    # a square image is exactly as far from 2:1 as from 1:2: the bigger bucket wins
    assert assign_bucket(50, 50, [(64, 32), (64, 128)]) == (64, 128)


def _keys():
    buckets = make_buckets(512)
    sizes = [(100, 100), (200, 100), (100, 200), (300, 300), (400, 200), (90, 300), (1000, 999)]
    return [assign_bucket(*s, buckets) for s in sizes * 5]


def test_batches_come_from_one_bucket_and_cover_everything():
    keys = _keys()
    batches = bucket_batches(keys, 3, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(1 <= len(b) <= 3 and len({keys[i] for i in b}) == 1 for b in batches)


def test_batches_are_deterministic_per_seed():
    keys = _keys()
    assert bucket_batches(keys, 2, rng=random.Random(5)) == bucket_batches(keys, 2, rng=random.Random(5))
    orders = {tuple(map(tuple, bucket_batches(keys, 2, rng=random.Random(s)))) for s in range(10)}
    assert len(orders) == 10


def test_drop_last_keeps_only_full_batches():
    keys = _keys()
    batches = bucket_batches(keys, 4, rng=random.Random(0), drop_last=True)
    assert batches and all(len(b) == 4 for b in batches)
    counts = {k: keys.count(k) for k in set(keys)}
    assert sum(len(b) for b in batches) == sum(c // 4 * 4 for c in counts.values())
    with pytest.raises(ValueError, match="batch_size"):
        bucket_batches(keys, 0, rng=random.Random(0))


@pytest.mark.parametrize("size, resolution, expect", [
    ((300, 200), 512, (256, 192)),     # small: its own size, sides rounded down to 64
    ((450, 550), 512, (448, 512)),     # small (247k px < 512² = 262k): rounded down, never up
    ((500, 700), 512, (384, 576)),     # 350k px: shrunk to 433x606 first
    ((1000, 1000), 512, (512, 512)),   # large: shrunk to the area first
    ((2048, 1024), 512, (704, 320)),   # large and wide: aspect kept (724x362), rounded down
    ((40, 30), 512, (64, 64)),         # below one step: one step
    ((61, 45), 64, (56, 40)),          # below resolution 256 the step is 8
])
def test_own_size_bucket(size, resolution, expect):
    from sdlora.data.buckets import own_size_bucket

    assert own_size_bucket(*size, resolution) == expect


def test_no_upscale_buckets_never_exceed_the_image(tmp_path):
    from types import SimpleNamespace

    from sdlora.data.training_set import TrainingSet

    sizes = [(300, 200), (200, 300), (512, 512), (900, 600), (128, 640), (1024, 256)]
    items = [SimpleNamespace(width=w, height=h, repeats=1, caption="", path=tmp_path / f"{i}.png") for i, (w, h) in enumerate(sizes)]
    upscaling = TrainingSet(items, resolution=512, enable_buckets=True, center_crop=True, random_flip=False, seed=0)
    keeping = TrainingSet(items, resolution=512, enable_buckets=True, center_crop=True, random_flip=False, seed=0,
                          bucket_no_upscale=True)
    assert upscaling.entries[0].size[0] > 300  # the plain buckets upscale a 300x200 image
    for entry in keeping.entries:
        item = items[entry.item_index]
        w, h = entry.size
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
        # a side larger than the image's would mean upscaling (one 64 px step of slack for very small images)
        assert w <= max(64, item.width) and h <= max(64, item.height), (item.width, item.height, entry.size)
    # images at or above resolution² use the same buckets either way
    assert keeping.entries[2].size == upscaling.entries[2].size == (512, 512)
    assert keeping.entries[3].size == upscaling.entries[3].size


def test_no_upscale_needs_buckets():
    from sdlora.config.train_config import ConfigError, make_config

    with pytest.raises(ConfigError, match="bucket_no_upscale needs aspect-ratio buckets"):
        make_config(data_dir="x", bucket_no_upscale=True)
    assert make_config(data_dir="x", bucket_no_upscale=True, enable_buckets=True).bucket_no_upscale
