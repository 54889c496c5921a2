"""Dataset scanning on a generated corpus of messy inputs: each file gets the expected outcome and message."""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_images import load_sizes, write_solid_png  # noqa: F401  (load_sizes is a fixture)

from sdlora.data import DatasetError, make_demo_dataset, scan_dataset


def _png(path: Path, size=(64, 64), color=(200, 50, 50), mode="RGB"):
    Image.new(mode, size, color).save(path)


def _encoded(fmt: str, size=(256, 256), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    img = Image.effect_noise(size, 60).convert(mode) if mode in ("RGB", "L") else Image.new(mode, size)
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _captioned(text: str | bytes, ext: str = ".txt"):
    def make(path: Path):
        _png(path)
        cap = path.with_suffix(ext)
        cap.write_bytes(text) if isinstance(text, bytes) else cap.write_text(text, encoding="utf-8")
    return make


def _animated(path: Path):
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def _rotated(path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x40, shown 40x80
    Image.new("RGB", (80, 40)).save(path, exif=exif.tobytes())


def _bad_crc_png(path: Path):
    data = bytearray(_encoded("PNG", (64, 64)))
    data[data.index(b"IDAT") + 20] ^= 0xFF
    path.write_bytes(bytes(data))


def _metadata_folder(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    _png(path)
    _png(path.parent / "meta_missing.png")
    rows = [json.dumps({"file_name": "meta.png", "text": "from  metadata\n"}), "{not json", json.dumps(["a list"])]
    (path.parent / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def _in_subfolder(make):
    def build(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    return build


# (path relative to the dataset root, "item" | "skipped", expected substring of a warning or the skip reason, builder)
CORPUS = [
    ("good.png", "item", "", _captioned("a red square, studio")),
    ("UPPER.JPG", "item", "", lambda p: p.write_bytes(_encoded("JPEG", (64, 64)))),
    ("png_named.jpg", "item", "", lambda p: _png(p)),  # the content decides, not the extension
    ("zero.png", "skipped", "zero-byte file", lambda p: p.write_bytes(b"")),
    ("truncated.jpg", "skipped", "truncated or corrupt image", lambda p: p.write_bytes(_encoded("JPEG")[:3000])),
    ("truncated.png", "skipped", "truncated or corrupt image", lambda p: p.write_bytes(_encoded("PNG")[:-40])),
    ("truncated.webp", "skipped", "", lambda p: p.write_bytes(_encoded("WEBP")[:2000])),
    ("truncated.bmp", "skipped", "truncated or corrupt image", lambda p: p.write_bytes(_encoded("BMP")[:5000])),
    ("truncated.gif", "skipped", "", lambda p: p.write_bytes(_encoded("GIF")[:3000])),
    ("bad_crc.png", "skipped", "truncated or corrupt image", _bad_crc_png),
    ("garbage.jpg", "skipped", "", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)),
    ("text.png", "skipped", "not an image (cannot identify image file)", lambda p: p.write_text("this is not an image")),
    ("cmyk.jpg", "item", "CMYK", lambda p: p.write_bytes(_encoded("JPEG", (64, 64), mode="CMYK"))),
    ("sixteen.png", "item", "16-bit", lambda p: Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(p)),
    ("palette.png", "item", "", lambda p: Image.new("P", (64, 64), 3).save(p)),
    ("palette_clear.gif", "item", "transparency", lambda p: Image.new("P", (64, 64), 0).save(p, transparency=0)),
    ("rgba.png", "item", "transparency", lambda p: _png(p, color=(255, 0, 0, 0), mode="RGBA")),
    ("opaque_rgba.png", "item", "", lambda p: _png(p, color=(1, 2, 3, 255), mode="RGBA")),
    ("gray.png", "item", "", lambda p: _png(p, color=90, mode="L")),
    ("gray_alpha.png", "item", "transparency", lambda p: _png(p, color=(90, 128), mode="LA")),
    ("bitmap.bmp", "item", "", lambda p: _png(p)),
    ("rotated.jpg", "item", "", _rotated),
    ("huge.png", "item", "large image (12000x12000)", lambda p: write_solid_png(p, 12000, 12000)),
    ("enormous.png", "skipped", "larger than the 250 megapixel limit", lambda p: write_solid_png(p, 16000, 16000)),
    ("tiny.png", "item", "will be upscaled", lambda p: _png(p, (16, 16))),
    ("anim.gif", "item", "animated (2 frames): the first frame is used", _animated),
    ("anim.webp", "item", "animated (2 frames)", _animated),
    ("ünïcode näme 猫.png", "item", "", lambda p: _png(p)),
    ("with spaces.png", "item", "", _captioned("spaced, caption")),
    ("link_out.png", "skipped", "symlink points outside the dataset folder",
     lambda p: p.symlink_to(p.parent.parent / "outside.png")),
    ("link_in.png", "item", "", lambda p: p.symlink_to(p.parent / "good.png")),
    ("broken_link.png", "skipped", "broken symlink", lambda p: p.symlink_to(p.parent / "gone.png")),
    ("fifo.png", "skipped", "not a regular file", lambda p: os.mkfifo(p)),
    ("noperm.png", "skipped", "unreadable (permission denied)", lambda p: (_png(p), os.chmod(p, 0))),
    ("empty_cap.png", "item", "caption file empty_cap.txt is empty", _captioned("   \n")),
    ("binary_cap.png", "item", "is binary", _captioned(b"\x00\x01\x02abc")),
    ("latin1_cap.png", "item", "is not UTF-8", _captioned("caf\xe9, cr\xe8me".encode("latin-1"))),
    ("long_cap.png", "item", "longer than 75 tokens will be truncated", _captioned(", ".join(f"tag{i}" for i in range(80)))),
    ("bom_cap.png", "item", "", _captioned("\ufeffbom caption".encode("utf-8"))),
    ("cap_ext.png", "item", "", _captioned("from caption file", ".caption")),
    ("cap_link_out.png", "item", "links outside the dataset folder",
     lambda p: (_png(p), p.with_suffix(".txt").symlink_to(p.parent.parent / "secret.txt"))),
    ("5_sub/nested/meta.png", "item", "", _metadata_folder),
    ("5_sub/nested/meta_missing.png", "item", "", lambda p: None),  # made by _metadata_folder
    ("5_sub/near.png", "item", "", _in_subfolder(_captioned("near"))),
    ("20240101_trip/photo.png", "item", "", _in_subfolder(_png)),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, report) for the corpus scanned once with min_size=32; permission denied is simulated when run as root."""
    root = tmp_path_factory.mktemp("bad") / "dataset"
    root.mkdir()
    _png(root.parent / "outside.png")
    (root.parent / "secret.txt").write_text("secret outside the dataset")
    for rel, _, _, build in CORPUS:
        build(root / rel)
    (root / ".hidden.png").write_bytes(b"")
    (root / ".git").mkdir()
    _png(root / ".git" / "inside_hidden_dir.png")
    (root / "notes.md").write_text("ignored")
    (root / "folder.png").mkdir()
    (root / "linked_dir").symlink_to(root / "5_sub", target_is_directory=True)
    real_open = builtins.open

    def open_as_non_root(file, *args, **kwargs):
        if str(file).endswith("noperm.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", open_as_non_root)
        report = scan_dataset(root, min_size=32)
    return root.resolve(), report


def _by_name(root: Path, report):
    items = {i.path.relative_to(root).as_posix(): i for i in report.items}
    skipped = {s.path.relative_to(root).as_posix(): s for s in report.skipped}
    return items, skipped


def test_bad_corpus_has_at_least_25_kinds():
    assert len(CORPUS) >= 25 and len({rel for rel, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("rel, outcome, needle", [c[:3] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_each_file_gets_the_expected_outcome(corpus, rel, outcome, needle):
    items, skipped = _by_name(*corpus)
    if outcome == "item":
        assert rel in items, skipped.get(rel)
        assert not needle or any(needle in w for w in items[rel].warnings), items[rel].warnings
    else:
        assert rel in skipped, items.get(rel)
        assert skipped[rel].reason and needle in skipped[rel].reason, skipped[rel].reason


def test_ignored_and_hidden_files_do_not_appear(corpus):
    root, report = corpus
    names = [p.relative_to(root).as_posix() for p in [i.path for i in report.items] + [s.path for s in report.skipped]]
    assert sorted(names) == sorted(rel for rel, *_ in CORPUS)
    assert any("folder link 'linked_dir' was not followed" in w for w in report.warnings)


def test_order_is_by_relative_path(corpus):
    root, report = corpus
    names = [i.path.relative_to(root).as_posix() for i in report.items]
    assert names == sorted(names)


def test_captions_from_every_source(corpus):
    items, _ = _by_name(*corpus)
    assert (items["good.png"].caption, items["good.png"].caption_source) == ("a red square, studio", "txt")
    assert items["good.png"].caption_path == corpus[0] / "good.txt"
    assert (items["cap_ext.png"].caption, items["cap_ext.png"].caption_source) == ("from caption file", "caption")
    meta = items["5_sub/nested/meta.png"]
    assert (meta.caption, meta.caption_source) == ("from metadata", "metadata")
    assert meta.caption_path == meta.path.with_suffix(".txt")  # where an edited caption would be written
    missing = items["5_sub/nested/meta_missing.png"]
    assert (missing.caption, missing.caption_source) == ("", "default")
    assert items["bom_cap.png"].caption == "bom caption"
    assert items["latin1_cap.png"].caption == "caf\ufffd, cr\ufffdme"
    for name in ("binary_cap.png", "empty_cap.png", "tiny.png", "cap_link_out.png"):
        assert (items[name].caption, items[name].caption_source) == ("", "default")
    warnings = corpus[1].warnings
    assert any("metadata.jsonl line 2 is not a JSON object" in w for w in warnings)
    assert any("metadata.jsonl line 3" in w for w in warnings)


def test_repeats_and_tag_frequency(corpus):
    root, report = corpus
    items, _ = _by_name(root, report)
    assert items["5_sub/nested/meta.png"].repeats == 5 and items["5_sub/near.png"].repeats == 5
    assert items["good.png"].repeats == 1 and items["20240101_trip/photo.png"].repeats == 1
    assert any("'20240101_trip'" in w and "counts as 1 repeat" in w for w in report.warnings)
    assert report.total_samples == report.num_images + 4 * 3
    assert report.tag_frequency["5_sub"] == {"from metadata": 1, "near": 1}
    assert report.tag_frequency["dataset"]["studio"] == 1 and report.tag_frequency["dataset"]["caption"] == 1


def test_size_is_reported_after_exif_rotation(corpus, tmp_path):
    items, _ = _by_name(*corpus)
    assert (items["rotated.jpg"].width, items["rotated.jpg"].height) == (40, 80)
    assert (items["huge.png"].width, items["huge.png"].height) == (12000, 12000)
    assert not any("transparency" in w for w in items["opaque_rgba.png"].warnings)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (80, 40)).save(tmp_path / "rotated.png", exif=exif.tobytes())
    for check in (True, False):
        item = scan_dataset(tmp_path, check_images=check).items[0]
        assert (item.width, item.height) == (40, 80)


def test_summary_and_dict(corpus):
    root, report = corpus
    summary = report.summary()
    first = summary.splitlines()[0]
    assert first == (f"Found {report.num_images} images in {root}: {report.num_captioned} captioned, "
                     f"{report.num_images - report.num_captioned} default caption, {report.num_skipped} skipped")
    assert "  skipped zero.png: zero-byte file" in summary and "20240101_trip" in summary
    data = json.loads(json.dumps(report.to_dict()))
    assert data["num_images"] == report.num_images and data["items"][0]["path"] == str(report.items[0].path)
    assert data["tag_frequency"] == report.tag_frequency


def test_tiny_images_are_skipped_when_upscaling_is_off(tmp_path):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "tiny.png", (40, 30))
    report = scan_dataset(tmp_path, min_size=64, upscale_small=False, check_images=False)
    assert [s.reason for s in report.skipped] == ["image 40x30 is smaller than the minimum 64 px and upscaling is off"]


def test_scan_never_decodes_a_huge_image_in_full(tmp_path, load_sizes):  # noqa: F811
    write_solid_png(tmp_path / "huge.png", 12000, 12000)
    Image.new("L", (12000, 2000), 9).save(tmp_path / "panorama.jpg", quality=30)
    report = scan_dataset(tmp_path)
    assert report.num_images == 2 and report.num_skipped == 0
    assert load_sizes and all(w * h <= 4_000_000 for w, h in load_sizes), load_sizes


def test_fast_scan_reads_headers_only(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "truncated.jpg").write_bytes(_encoded("JPEG")[:3000])
    (tmp_path / "zero.png").write_bytes(b"")
    fast = scan_dataset(tmp_path, check_images=False)
    assert sorted(i.path.name for i in fast.items) == ["ok.png", "truncated.jpg"]  # truncation needs a decode
    assert [s.path.name for s in fast.skipped] == ["zero.png"]
    assert sorted(s.path.name for s in scan_dataset(tmp_path).skipped) == ["truncated.jpg", "zero.png"]


def test_repeats_from_the_root_folder_name(tmp_path):
    root = tmp_path / "3_chars"
    (root / "plain").mkdir(parents=True)
    _png(root / "a.png")
    _png(root / "plain" / "b.png")
    report = scan_dataset(root)
    assert [i.repeats for i in report.items] == [3, 3] and list(report.tag_frequency) == ["3_chars"]


def test_missing_file_and_unreadable_folders_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"Dataset folder '.*nope' does not exist\. Point --data at a folder"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_dataset(tmp_path / "file.txt")
    data = tmp_path / "data"
    (data / "private").mkdir(parents=True)
    _png(data / "ok.png")
    _png(data / "private" / "hidden_from_us.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name in ("private", "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = scan_dataset(data)
    assert report.num_images == 1 and any("private" in w and "unreadable" in w for w in report.warnings)
    (tmp_path / "locked").mkdir()
    with pytest.raises(DatasetError, match=r"Dataset folder '.*locked' is unreadable \(Permission denied\)"):
        scan_dataset(tmp_path / "locked")


def test_no_usable_images_names_folder_reasons_and_formats(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"No usable images in '.*empty': it holds no image files\. Accepted types: \.png"):
        scan_dataset(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(5):
        (broken / f"b{i}.png").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        scan_dataset(broken)
    message = str(err.value)
    assert "all 5 image file(s) were skipped (b0.png: zero-byte file; b1.png" in message
    assert "and 2 more" in message and ".jpg" in message and str(broken) in message


def test_no_usable_images_fails_before_model_load(tmp_path, monkeypatch):
    from sdlora import models
    from sdlora.config.train_config import make_config
    from sdlora.training.trainer import train

    def boom(*a, **k):
        raise AssertionError("model loaded before the dataset was checked")

    monkeypatch.setattr(models, "load_base_model", boom)
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError):
        train(make_config(data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "o"), resolution=64))


def test_demo_dataset(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", count=4, size=64, seed=3)
    assert root == tmp_path / "demo"
    report = scan_dataset(root)
    assert report.num_images == 4 and report.num_captioned == 4 and report.total_samples == 40
    assert all(i.caption.endswith(("centered", "left", "right", "top", "bottom")) and " background, " in i.caption
               and i.path.parent.name == "10_demo" and i.width == 64 for i in report.items)
    assert list(report.tag_frequency) == ["10_demo"] and not report.skipped and not report.warnings
    # deterministic for a seed, different for another
    files = sorted(p.name for p in (root / "10_demo").iterdir())
    same = make_demo_dataset(tmp_path / "again", count=4, size=64, seed=3) / "10_demo"
    other = make_demo_dataset(tmp_path / "other", count=4, size=64, seed=4) / "10_demo"
    assert all((root / "10_demo" / f).read_bytes() == (same / f).read_bytes() for f in files)
    assert any((root / "10_demo" / f).read_bytes() != (other / f).read_bytes() for f in files if f.endswith(".png"))
    # idempotent: a second call leaves the set alone
    stamp = (root / "10_demo" / "mascot_00.png").stat().st_mtime_ns
    make_demo_dataset(root, count=9, seed=99)
    assert (root / "10_demo" / "mascot_00.png").stat().st_mtime_ns == stamp and len(list((root / "10_demo").glob("*.png"))) == 4
    assert [p.name for p in root.iterdir()] == ["10_demo"]  # no temp folders left behind
    # someone else's 10_demo folder is never replaced
    (tmp_path / "mine" / "10_demo").mkdir(parents=True)
    (tmp_path / "mine" / "10_demo" / "precious.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not an sdlora demo set"):
        make_demo_dataset(tmp_path / "mine")
    assert (tmp_path / "mine" / "10_demo" / "precious.png").exists()


def test_second_demo_dataset_names_the_new_colour(tmp_path):
    """builtin:demo-navy: base-world shapes on navy, every caption naming it, beside (not inside) the mascot set."""
    from sdlora.data.demo import DEMO_SETS
    from sdlora.data.scenes import COLOURS, NAVY
    from sdlora.paths import BUILTIN_DATA

    assert set(DEMO_SETS) == set(BUILTIN_DATA)  # every built-in name has a drawing and a cache folder

    root = make_demo_dataset(tmp_path / "navy", which="builtin:demo-navy", size=64)
    report = scan_dataset(root)
    assert report.num_images == 16 and report.total_samples == 80 and list(report.tag_frequency) == ["5_navy"]
    assert all("navy background" in i.caption and any(c in i.caption for c in COLOURS) for i in report.items)
    corner = Image.open(report.items[0].path).convert("RGB").getpixel((0, 0))
    assert corner == NAVY
