"""Dataset scanning on a generated corpus of messy inputs: each file gets the expected outcome and message."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config import make_config
from sdlora.data import (DatasetError, build_caption, bulk_edit_captions, load_training_image, make_buckets, open_image_rgb,
                         assign_bucket, bucket_batches, scan_dataset, write_caption)


def _png(path: Path, size=(64, 64), color=(200, 50, 50), mode="RGB"):
    Image.new(mode, size, color).save(path)


def _jpeg_bytes(size=(64, 64), color=(10, 200, 10), mode="RGB", exif=None) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, color)
    if exif is not None:
        img.save(buf, "JPEG", exif=exif)
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def build_bad_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """name -> ("item"|"skipped", expected substring of a reason/warning ("" = no particular text))."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, tuple[str, str]] = {}

    def add(name, outcome, needle=""):
        expect[name] = (outcome, needle)

    _png(root / "good.png"); (root / "good.txt").write_text("a red square, studio")
    add("good.png", "item")
    (root / "zero.png").write_bytes(b""); add("zero.png", "skipped", "zero-byte")
    full = _jpeg_bytes((256, 256))
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2]); add("truncated.jpg", "skipped", "corrupt")
    buf = io.BytesIO(); Image.new("RGB", (256, 256), (1, 2, 3)).save(buf, "PNG"); png = buf.getvalue()
    (root / "truncated.png").write_bytes(png[: len(png) - 40]); add("truncated.png", "skipped", "corrupt")
    buf = io.BytesIO(); Image.effect_noise((128, 128), 50).convert("RGB").save(buf, "WEBP"); webp = buf.getvalue()
    (root / "truncated.webp").write_bytes(webp[: len(webp) // 2]); add("truncated.webp", "skipped", "")
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300)); add("garbage.jpg", "skipped", "")
    (root / "text.png").write_text("this is not an image"); add("text.png", "skipped", "not an image")
    (root / "cmyk.jpg").write_bytes(_jpeg_bytes(mode="CMYK", color=(0, 255, 255, 0))); add("cmyk.jpg", "item", "CMYK")
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(root / "sixteen.png"); add("sixteen.png", "item")
    Image.new("P", (64, 64), 3).save(root / "palette.png"); add("palette.png", "item")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(root / "rgba.png"); add("rgba.png", "item")
    Image.new("L", (64, 64), 90).save(root / "gray.png"); add("gray.png", "item")
    Image.new("LA", (64, 64), (90, 128)).save(root / "gray_alpha.png"); add("gray_alpha.png", "item")
    exif = Image.Exif(); exif[0x0112] = 6
    (root / "rotated.jpg").write_bytes(_jpeg_bytes((80, 40), exif=exif.tobytes())); add("rotated.jpg", "item")
    Image.new("RGB", (12000, 12000), (5, 5, 5)).save(root / "huge.png", optimize=False); add("huge.png", "item")
    _png(root / "tiny.png", (16, 16)); add("tiny.png", "item", "upscaled")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:]); add("anim.gif", "item", "animated")
    frames[0].save(root / "anim.webp", save_all=True, append_images=frames[1:]); add("anim.webp", "item", "animated")
    _png(root / "ünïcode näme 猫.png"); add("ünïcode näme 猫.png", "item")
    _png(root / "with spaces.png"); (root / "with spaces.txt").write_text("spaced, caption"); add("with spaces.png", "item")
    outside = root.parent / "outside.png"; _png(outside)
    (root / "link_out.png").symlink_to(outside); add("link_out.png", "skipped", "outside the dataset folder")
    (root / "link_in.png").symlink_to(root / "good.png"); add("link_in.png", "item")
    _png(root / "empty_cap.png"); (root / "empty_cap.txt").write_text("   \n"); add("empty_cap.png", "item", "empty")
    _png(root / "binary_cap.png"); (root / "binary_cap.txt").write_bytes(b"\x00\x01\x02abc"); add("binary_cap.png", "item", "binary")
    _png(root / "latin1_cap.png"); (root / "latin1_cap.txt").write_bytes("caf\xe9, cr\xe8me".encode("latin-1")); add("latin1_cap.png", "item", "not UTF-8")
    _png(root / "long_cap.png"); (root / "long_cap.txt").write_text(", ".join(f"tag{i}" for i in range(80))); add("long_cap.png", "item", "longer than 75 tokens")
    _png(root / "bom_cap.png"); (root / "bom_cap.txt").write_bytes("\ufeffbom caption".encode("utf-8")); add("bom_cap.png", "item")
    _png(root / "cap_ext.png"); (root / "cap_ext.caption").write_text("from caption file"); add("cap_ext.png", "item")
    sub = root / "5_sub" / "nested"; sub.mkdir(parents=True)
    _png(sub / "meta.png"); _png(sub / "meta_missing.png")
    (sub / "metadata.jsonl").write_text(json.dumps({"file_name": "meta.png", "text": "from metadata"}) + "\n{not json\n")
    add("5_sub/nested/meta.png", "item"); add("5_sub/nested/meta_missing.png", "item")
    _png(root / "noperm.png")
    os.chmod(root / "noperm.png", 0)
    add("noperm.png", "skipped" if os.geteuid() != 0 else "item", "")  # root reads everything
    (root / ".hidden.png").write_bytes(b"")  # ignored entirely
    (root / "notes.md").write_text("ignored")
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "dataset"
    expect = build_bad_corpus(root)
    return root, expect


def test_bad_corpus_has_at_least_25_kinds(corpus):
    assert len(corpus[1]) >= 25


def test_scan_reports_every_file_with_a_reason(corpus):
    root, expect = corpus
    report = scan_dataset(root, min_size=32)
    items = {str(i.path.relative_to(root.resolve())): i for i in report.items}
    skipped = {str(s.path.relative_to(root.resolve())) if s.path.is_relative_to(root.resolve()) else s.path.name: s for s in report.skipped}
    for name, (outcome, needle) in expect.items():
        if outcome == "item":
            assert name in items, (name, skipped.get(name))
            if needle:
                assert any(needle in w for w in items[name].warnings), (name, items[name].warnings)
        else:
            assert name in skipped, (name, items.get(name))
            assert skipped[name].reason
            assert needle in skipped[name].reason, (name, skipped[name].reason)
    assert not any(".hidden" in n for n in list(items) + list(skipped))
    # captions from each source
    assert items["good.png"].caption == "a red square, studio" and items["good.png"].caption_source == "txt"
    assert items["cap_ext.png"].caption_source == "caption"
    assert items["5_sub/nested/meta.png"].caption == "from metadata" and items["5_sub/nested/meta.png"].caption_source == "metadata"
    assert items["5_sub/nested/meta.png"].repeats == 5 and items["good.png"].repeats == 1
    assert items["bom_cap.png"].caption == "bom caption"
    assert items["latin1_cap.png"].caption.startswith("caf")
    assert items["binary_cap.png"].caption_source == "default"
    assert items["rotated.jpg"].width == 40 and items["rotated.jpg"].height == 80
    assert any("line 2" in w for w in report.warnings)  # the bad metadata.jsonl line
    summary = report.summary()
    assert summary.startswith(f"Found {report.num_images} images") and "zero-byte" in summary
    json.dumps(report.to_dict())
    assert report.tag_frequency["5_sub"]["from metadata"] == 1


def test_tiny_images_skipped_when_upscaling_is_off(corpus):
    root, _ = corpus
    report = scan_dataset(root, min_size=32, upscale_small=False)
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert "smaller than the minimum 32 px" in reasons["tiny.png"]


def test_every_usable_image_trains_upright_rgb(corpus):
    root, _ = corpus
    report = scan_dataset(root, min_size=32)
    for item in report.items:
        t = load_training_image(item.path, (64, 64))
        assert t.shape == (3, 64, 64) and t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1


def test_training_run_survives_the_bad_corpus(corpus, tmp_path):
    from sdlora.train import train

    root, _ = corpus
    events = []
    result = train(make_config(base_model="builtin:tiny", data_dir=str(root), output_dir=str(tmp_path), steps=3, rank=2,
                               resolution=64, batch_size=4), on_event=events.append)
    assert result.lora_path.is_file()
    assert any("skipped" in e.data.get("message", "") for e in events if e.kind == "status")


def test_conversions_are_right(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert abs(np.asarray(open_image_rgb(tmp_path / "g16.png"))[0, 0, 0] - 128) <= 1
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert tuple(np.asarray(open_image_rgb(tmp_path / "clear.png"))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(open_image_rgb(tmp_path / "clear.png", background=(0, 0, 0)))[0, 0]) == (0, 0, 0)
    # EXIF orientation 6 (rotate 90° CW to view): a marker in the stored top-left ends up top-right.
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif(); exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    up = np.asarray(open_image_rgb(tmp_path / "rot.jpg"))
    assert up.shape[:2] == (80, 40)
    assert up[3, 36].mean() > 200 and up[3, 3].mean() < 60
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = np.asarray(open_image_rgb(tmp_path / "c.jpg"))[4, 4]
    assert r > 200 and g < 60 and b < 60


def test_huge_image_is_reduced_without_full_decode(tmp_path):
    Image.new("RGB", (12000, 12000), (9, 9, 9)).save(tmp_path / "huge.jpg", quality=50)
    img = open_image_rgb(tmp_path / "huge.jpg")
    assert max(img.size) <= 8192
    t = load_training_image(tmp_path / "huge.jpg", (64, 64))
    assert t.shape == (3, 64, 64)


def test_missing_unreadable_and_empty_folders_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        scan_dataset(tmp_path / "file.txt")
    empty = tmp_path / "empty"; empty.mkdir()
    (empty / "broken.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"No usable images .*broken.png: zero-byte"):
        scan_dataset(empty)


def test_no_usable_images_fails_before_model_load(tmp_path, monkeypatch):
    import sdlora.models as models
    from sdlora.train import train

    def boom(*a, **k):
        raise AssertionError("model loaded before the dataset was checked")

    monkeypatch.setattr(models, "load_base_model", boom)
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError):
        train(make_config(data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), resolution=64))


def test_captions_build_and_write(tmp_path):
    rng = random.Random(0)
    assert build_caption("a, b, c", trigger_word="sks") == "sks, a, b, c"
    assert build_caption("sks, a", trigger_word="sks") == "sks, a"
    shuffled = {build_caption("k, a, b, c, d, e", trigger_word="T", shuffle_tags=True, keep_tokens=1, rng=random.Random(s)) for s in range(20)}
    assert len(shuffled) > 1 and all(s.startswith("T, k, ") for s in shuffled)
    assert build_caption("a, b", caption_dropout=0.999, rng=rng) == ""
    assert build_caption("x, y, z", shuffle_tags=True, rng=random.Random(5)) == build_caption("x, y, z", shuffle_tags=True, rng=random.Random(5))
    cap = tmp_path / "img.txt"
    cap.write_text("original")
    write_caption(cap, "new text", root=tmp_path)
    assert cap.read_text().strip() == "new text"
    with pytest.raises(ValueError, match="outside the dataset folder"):
        write_caption(tmp_path / ".." / ".." / "x.txt", "evil", root=tmp_path)


def test_caption_write_failure_keeps_original(tmp_path, monkeypatch):
    cap = tmp_path / "img.txt"
    cap.write_text("original")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_caption(cap, "new", root=tmp_path)
    assert cap.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


def test_bulk_edit(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a cat, number {i}")
    report = scan_dataset(tmp_path)
    assert bulk_edit_captions(report.items, find="cat", replace="dog", prepend="sks", root=tmp_path) == 3
    assert (tmp_path / "1.txt").read_text().strip() == "sks, a dog, number 1"


def test_buckets():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    w, h = assign_bucket(2000, 1000, buckets)
    assert w > h and 1.5 < w / h < 2.6
    keys = [assign_bucket(*s, buckets) for s in [(100, 100), (200, 100), (100, 200), (300, 300), (400, 200)] * 3]
    batches = bucket_batches(keys, 2, rng=random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    assert batches == bucket_batches(keys, 2, rng=random.Random(1))
    assert make_buckets(64)  # tiny resolutions still bucket
