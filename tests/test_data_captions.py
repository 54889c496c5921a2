"""Captions: tags, trigger word, shuffle/keep-tokens/dropout, atomic writes that stay inside the dataset, bulk edits."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from sdlora.data import (
    build_caption,
    bulk_edit_captions,
    scan_dataset,
    split_tags,
    write_caption,
)
from sdlora.data.captions import CaptionWriteError


def test_split_tags():
    assert split_tags(" a red circle ,, blue background,  centered , ") == ["a red circle", "blue background", "centered"]
    assert split_tags("") == [] and split_tags("no commas here") == ["no commas here"]


@pytest.mark.parametrize("caption, expected", [
    ("a, b, c", "sks, a, b, c"),
    ("sks, a", "sks, a"),  # already first: not doubled
    ("a, sks, b", "sks, a, b"),  # elsewhere: moved to the front
    ("sks person, smiling", "sks person, smiling"),  # first tag starts with the trigger word
    ("", "sks"),
])
def test_trigger_word_comes_first_once(caption, expected):
    assert build_caption(caption, trigger_word="sks") == expected


def test_without_options_the_caption_is_only_normalised():
    assert build_caption(" a,b ,  c ") == "a, b, c"
    assert build_caption("a, b", trigger_word="  ") == "a, b"


def test_shuffle_keeps_the_trigger_and_keep_tokens_in_place():
    caption = "k1, k2, a, b, c, d, e"
    seen = set()
    for seed in range(30):
        out = build_caption(caption, trigger_word="T", shuffle_tags=True, keep_tokens=2, rng=random.Random(seed))
        tags = split_tags(out)
        assert tags[:3] == ["T", "k1", "k2"] and sorted(tags[3:]) == ["a", "b", "c", "d", "e"]
        seen.add(out)
    assert len(seen) > 5
    a = build_caption(caption, shuffle_tags=True, rng=random.Random(7))
    assert a == build_caption(caption, shuffle_tags=True, rng=random.Random(7))  # deterministic for a seed


def test_dropout_returns_the_empty_caption_trigger_included():
    outs = [build_caption("a, b", trigger_word="sks", caption_dropout=0.5, rng=random.Random(s)) for s in range(200)]
    assert set(outs) == {"", "sks, a, b"}
    assert 60 < outs.count("") < 140
    assert build_caption("a", caption_dropout=1.0, rng=random.Random(0)) == ""
    assert all(build_caption("a", caption_dropout=0.0, rng=random.Random(s)) == "a" for s in range(20))
    with pytest.raises(ValueError, match="caption_dropout"):
        build_caption("a", caption_dropout=1.5)


def test_write_caption_replaces_and_accepts_the_image_path(tmp_path):
    cap = tmp_path / "img.txt"
    cap.write_text("original")
    os.chmod(cap, 0o644)
    assert write_caption(cap, "  new text \n", root=tmp_path) == cap
    assert cap.read_text() == "new text\n" and (cap.stat().st_mode & 0o777) == 0o644
    assert write_caption(tmp_path / "photo.PNG", "from the image path") == tmp_path / "photo.txt"
    assert write_caption("rel.txt", "relative to root", root=tmp_path) == tmp_path / "rel.txt"
    assert (tmp_path / "rel.txt").read_text().strip() == "relative to root"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.txt", "photo.txt", "rel.txt"]


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_failed_write_keeps_the_original_and_leaves_no_temp_file(tmp_path, monkeypatch, failing):
    cap = tmp_path / "img.txt"
    cap.write_text("original")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(Path, "write_text", disk_full)
    else:
        monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(CaptionWriteError, match="Cannot write caption .*img.txt.*No space left"):
        write_caption(cap, "new", root=tmp_path)
    monkeypatch.undo()
    assert cap.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


def test_write_caption_refuses_paths_outside_the_dataset(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ValueError, match="outside the dataset folder"):
        write_caption(root / ".." / ".." / "x.txt", "evil", root=root)
    with pytest.raises(ValueError, match="outside the dataset folder"):
        write_caption("../../x.txt", "evil", root=root)
    (tmp_path / "victim.txt").write_text("safe")
    (root / "link.txt").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(ValueError, match="outside the dataset folder"):
        write_caption(root / "link.txt", "evil", root=root)
    with pytest.raises(ValueError, match="caption files end in"):
        write_caption(root / "notes.md", "x", root=root)
    assert (tmp_path / "victim.txt").read_text() == "safe" and not (tmp_path / "x.txt").exists()


def _dataset(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c", "meta", "bare"):
        Image.new("RGB", (16, 16), (9, 9, 9)).save(root / f"{name}.png")
    (root / "a.txt").write_text("a cat, indoors")
    (root / "b.txt").write_text("a black cat")
    (root / "c.caption").write_text("a dog")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "meta.png", "text": "a cat from metadata"}) + "\n")
    return root


def test_bulk_edit(tmp_path):
    root = _dataset(tmp_path / "data")
    report = scan_dataset(root)
    assert bulk_edit_captions(report, find="cat", replace="dog", prepend="sks", append="photo") == 4
    assert (root / "a.txt").read_text().strip() == "sks, a dog, indoors, photo"
    assert (root / "b.txt").read_text().strip() == "sks, a black dog, photo"
    assert (root / "c.caption").read_text().strip() == "sks, a dog, photo"
    assert (root / "meta.txt").read_text().strip() == "sks, a dog from metadata, photo"  # .txt now takes precedence
    assert not (root / "bare.txt").exists()  # no caption: the default caption from the config applies
    by_name = {i.path.name: i for i in report.items}
    assert by_name["meta.png"].caption_source == "txt" and by_name["a.png"].caption == "sks, a dog, indoors, photo"
    again = scan_dataset(root)
    assert {i.path.name: i.caption for i in again.items} == {i.path.name: i.caption for i in report.items}
    # The same edit again changes nothing (prefix/suffix are not doubled).
    assert bulk_edit_captions(again.items, prepend="sks", append="photo", root=root) == 0


def test_bulk_edit_joins_phrases_and_edits_a_shared_caption_once(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for ext in ("png", "jpg"):
        Image.new("RGB", (16, 16)).save(root / f"same.{ext}")
    (root / "same.txt").write_text("cat")
    report = scan_dataset(root)
    assert any("share the caption file same.txt" in w for w in report.warnings)
    assert bulk_edit_captions(report, find="cat", replace="black cat", prepend="photo of ") == 1
    assert (root / "same.txt").read_text().strip() == "photo of black cat"
    assert [i.caption for i in report.items] == ["photo of black cat"] * 2


def test_bulk_edit_refuses_caption_files_outside_root(tmp_path):
    root = _dataset(tmp_path / "data")
    report = scan_dataset(root)
    (tmp_path / "victim.txt").write_text("safe")
    report.items[0].caption_path = tmp_path / "victim.txt"
    with pytest.raises(ValueError, match="outside the dataset folder"):
        bulk_edit_captions(report, append="x")
    assert (tmp_path / "victim.txt").read_text() == "safe"
