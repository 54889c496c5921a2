"""Auto-captioning: a tiny ONNX tagger and tiny random BLIP / GIT models built here (never downloaded), the modes,
thresholds and categories, undo, dry runs, broken model folders, corrupt images and the CLI end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from caption_helpers import REPO_ID, SIZE, TAGS, build_caption_model, build_tagger, colour_dataset, kohya_tagger, sigmoid
from conftest import run_cli
from PIL import Image

from sdlora.captioning import CaptionOptions, CaptioningError, TagOptions, TextOptions
from sdlora.captioning.images import wd14_array
from sdlora.captioning.options import parse_replacements
from sdlora.captioning.run import CaptionDone, CaptionImage, CaptionStart, CaptionWarning, caption_dataset, load_model
from sdlora.captioning.wd14 import WD14Tagger, read_tag_list, select_tags
from sdlora.captioning.writer import BACKUP_DIR, compose, undo_last_run

RED, BLUE, HALF_RED = (255, 0, 0), (0, 0, 255), (128, 0, 0)
RED_TAGS = "hatsune miku, red background, ^_^"  # character first, then general by probability; no rating


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("tagger") / "wd14")


def run(root, model, **kw):
    """(summary, events) of one captioning run."""
    tag_kw = {k: kw.pop(k) for k in list(kw) if k in TagOptions.__dataclass_fields__}
    events = list(caption_dataset(root, CaptionOptions(kind=kw.pop("kind", "wd14"), model=str(model), tags=TagOptions(**tag_kw), **kw)))
    assert isinstance(events[-1], CaptionDone)
    return events[-1].summary, events


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (hidden ones too) with its bytes and mode."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777) for p in sorted(root.rglob("*")) if p.is_file()}


def expected_probs(bgr_means: np.ndarray) -> np.ndarray:
    w = np.array([t[2] for t in TAGS], dtype=np.float64).T / 255.0
    b = np.array([t[3] for t in TAGS], dtype=np.float64)
    return sigmoid(bgr_means @ w + b)


def test_preprocessing_pads_with_white_resizes_to_the_model_size_and_feeds_bgr(tagger):
    model = WD14Tagger(tagger, TagOptions())
    model.load()
    assert model.size == SIZE and model.device == "cpu"  # read from the ONNX input shape
    tall = Image.new("RGB", (16, 32), RED)  # 16 wide: padded to 32x32 with white on both sides
    arr = wd14_array(tall, model.size)
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.float32
    assert (arr[:, 8:24] == [0, 0, 255]).all()  # BGR: red is the last channel
    assert (arr[:, :8] == 255).all() and (arr[:, 24:] == 255).all()
    big = Image.new("RGB", (100, 100), BLUE)
    assert (wd14_array(big, SIZE) == [255, 0, 0]).all()
    probs = model.probabilities([tall, big])
    means = np.stack([arr.reshape(-1, 3).mean(0), np.array([255.0, 0, 0])])
    np.testing.assert_allclose(probs, expected_probs(means), rtol=1e-4, atol=1e-5)
    # the padding shows in what the tagger sees: half of the tall image is white, so blue and green are 0.5
    assert probs[0][2] == pytest.approx(0.5, abs=0.01) and probs[1][2] > 0.99
    model.close()
    assert model.session is None


def test_thresholds_categories_and_tag_options(tagger):
    tags = read_tag_list(tagger / "selected_tags.csv")
    model = WD14Tagger(tagger, TagOptions())
    model.load()
    red, half = model.probabilities([Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), HALF_RED)])

    def names(probs, **kw):
        return [n for n, _ in select_tags(probs, tags, TagOptions(**kw))]

    assert ", ".join(names(red)) == RED_TAGS
    assert names(red, include_ratings=True)[-1] == "general"  # the most likely rating, last; off by default
    assert names(red, threshold=0.6) == ["hatsune miku", "red background"]  # ^_^ is 0.5
    assert names(red, character_threshold=0.999) == ["red background", "^_^"]
    assert names(half) == ["red background", "^_^"]  # p 0.505: a general tag at 0.35, not a character at 0.85
    assert names(half, character_threshold=0.5)[0] == "hatsune miku"
    assert names(red, underscores_to_spaces=False) == ["hatsune_miku", "red_background", "^_^"]
    assert names(red, undesired="^_^, hatsune_miku") == ["red background"]
    assert names(red, replacements="red_background,crimson;hatsune miku,") == ["crimson", "^_^"]
    assert names(red, replacements="red background,^_^") == ["hatsune miku", "^_^"]  # no tag twice
    assert names(red, max_tags=2) == ["hatsune miku", "red background"]
    assert parse_replacements(r"a\,b,c;d,e\;f") == [("a,b", "c"), ("d", "e;f")]
    with pytest.raises(CaptioningError, match="old,new"):
        parse_replacements("lonely")
    with pytest.raises(CaptioningError, match="threshold: must be between 0 and 1"):
        TagOptions(threshold=1.5)


@pytest.mark.parametrize("mode, trigger, blue", [
    ("skip", "", "sks, my blue"),
    ("overwrite", "", "blue background, ^_^"),
    ("overwrite", "sks", "sks, blue background, ^_^"),
    ("append", "", "sks, my blue, blue background, ^_^"),
    ("prepend", "", "blue background, ^_^, sks, my blue"),
    ("prepend", "sks", "sks, blue background, ^_^, my blue"),
])
def test_modes_and_the_trigger_word(tmp_path, tagger, mode, trigger, blue):
    data = colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE})
    (data / "blue.txt").write_text("sks, my blue\n")
    summary, _ = run(data, tagger, mode=mode, trigger_word=trigger)
    assert (data / "blue.txt").read_text().strip() == blue
    assert (data / "red.txt").read_text().strip() == RED_TAGS  # training puts the trigger in front; not added here
    assert summary.created == 1 and summary.skipped == (mode == "skip") and summary.replaced == (mode != "skip")
    assert summary.tags["^_^"] == 2 - (mode == "skip")
    if trigger:
        assert "sks" not in summary.tags  # the frequency report counts the model's tags, not the trigger word


def test_caption_extension_and_compose_rules(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE})
    (data / "blue.txt").write_text("mine\n")
    run(data, tagger, extension="caption")
    assert (data / "red.caption").read_text().strip() == RED_TAGS and not (data / "red.txt").exists()
    assert not (data / "blue.caption").exists()  # blue.txt is a caption already: skipped
    assert compose("sks person, smile", ["smile", "sks"], "append", "sks") == "sks person, smile"
    assert compose("", ["a", "b"], "overwrite", "sks") == "a, b"
    assert compose("my blue, sks", ["sks", "c"], "prepend", "sks") == "c, my blue, sks"  # not first: left where it is


def test_undo_restores_exactly_and_keeps_later_edits(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE, "half": HALF_RED})
    (data / "blue.txt").write_text("  sks, my blue \n\n")  # odd whitespace: undo must give back these very bytes
    os.chmod(data / "blue.txt", 0o640)
    (data / "half.caption").write_text("from a .caption file")
    before = tree(data)
    summary, _ = run(data, tagger, mode="overwrite")
    assert summary.replaced == 1 and summary.created == 2  # half.txt is new: the .caption file stays beside it
    assert (data / BACKUP_DIR / "manifest.jsonl").is_file()
    assert (data / "half.txt").read_text().strip() == "red background, ^_^"
    report = undo_last_run(data)
    assert sorted(report.restored) == ["blue.txt"] and sorted(report.removed) == ["half.txt", "red.txt"]
    assert tree(data) == before  # the backup folder is gone too
    with pytest.raises(CaptioningError, match="Nothing to undo"):
        undo_last_run(data)
    # a caption edited after the run is left as it is, and named
    run(data, tagger, mode="overwrite")
    (data / "red.txt").write_text("edited by hand\n")
    report = undo_last_run(data)
    assert report.kept == ["red.txt"] and "red.txt" in report.summary()
    assert (data / "red.txt").read_text() == "edited by hand\n"
    assert (data / "blue.txt").read_bytes() == before["blue.txt"][0]


def test_a_run_that_changes_nothing_keeps_the_previous_backup(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED})
    run(data, tagger)
    summary, _ = run(data, tagger, mode="overwrite")  # the same tags again: nothing written
    assert summary.unchanged == 1 and summary.tagged == 0
    assert undo_last_run(data).removed == ["red.txt"] and not (data / "red.txt").exists()


def test_dry_run_writes_nothing_and_says_what_would_change(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE})
    (data / "blue.txt").write_text("old words\n")
    before = tree(data)
    summary, events = run(data, tagger, mode="append", dry_run=True)
    assert tree(data) == before
    assert summary.changes == [("blue.txt", "old words", "old words, blue background, ^_^"), ("red.txt", "", RED_TAGS)]
    assert [e.action for e in events if isinstance(e, CaptionImage)] == ["would replace", "would create"]
    assert summary.lines()[-1] == "dry run: no file was written"


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED})
    (data / "garbage.png").write_bytes(os.urandom(300))
    good = data / "red.png"
    (data / "truncated.png").write_bytes(good.read_bytes()[:60])  # a valid header, no image data
    summary, events = run(data, tagger)
    warnings = [e.message for e in events if isinstance(e, CaptionWarning)]
    assert any("garbage.png" in w for w in warnings) and any("truncated.png" in w for w in warnings), warnings
    assert (data / "red.txt").read_text().strip() == RED_TAGS
    assert not (data / "garbage.txt").exists() and not (data / "truncated.txt").exists()
    assert summary.created == 1
    # a caption file linked outside the dataset is neither read nor written through; the run goes on
    secret = tmp_path / "secret.txt"
    secret.write_text("private\n")
    colour_dataset(data, {"linked": RED})
    (data / "linked.txt").symlink_to(secret)
    summary, events = run(data, tagger, mode="overwrite")
    assert any("linked.txt' links outside the dataset folder" in e.message for e in events if isinstance(e, CaptionWarning))
    # failed: the link and truncated.png (garbage.png never gets that far: the scan skips it, with its warning)
    assert secret.read_text() == "private\n" and summary.failed == 2
    assert not any(b"private" in p.read_bytes() for p in (data / BACKUP_DIR).rglob("*") if p.is_file())


def test_broken_model_folders_get_a_sentence_naming_the_file(tmp_path, tagger):
    data = colour_dataset(tmp_path / "data", {"red": RED})

    def refused(folder, match, kind="wd14"):
        with pytest.raises(CaptioningError, match=match):
            model = load_model(CaptionOptions(kind=kind, model=str(folder), model_dirs=[tmp_path / "models"]))
            model.load()

    refused(tmp_path / "missing", "does not exist")
    refused("someone/some-tagger", r"not downloaded.*hf download someone/some-tagger model.onnx selected_tags.csv")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "selected_tags.csv").write_bytes((tagger / "selected_tags.csv").read_bytes())
    refused(no_model, "has no model.onnx")
    not_onnx = tmp_path / "not_onnx"
    not_onnx.mkdir()
    (not_onnx / "selected_tags.csv").write_bytes((tagger / "selected_tags.csv").read_bytes())
    (not_onnx / "model.onnx").write_text("<html>404 not found</html>")
    refused(not_onnx, r"not_onnx/model.onnx' is not a usable ONNX model")
    refused(not_onnx / "selected_tags.csv", "is a file")
    bad_header = build_tagger(tmp_path / "bad_header")
    (bad_header / "selected_tags.csv").write_text("id,tag\n0,general\n")
    refused(bad_header, r"bad_header/selected_tags.csv' does not start with the header tag_id,name,category,count")
    bad_row = build_tagger(tmp_path / "bad_row")
    (bad_row / "selected_tags.csv").write_text("tag_id,name,category,count\n0,general,nine,1\n")
    refused(bad_row, "selected_tags.csv' line 2")
    short = build_tagger(tmp_path / "short")
    (short / "selected_tags.csv").write_text("tag_id,name,category,count\n0,general,9,1\n")
    refused(short, "gives 7 tag probabilities but 'selected_tags.csv' lists 1")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refused(tmp_path / "llm", r"model_type 'llama'.*BLIP", kind="captioner")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "git", "auto_map": {"AutoModel": "x.Y"}}))
    refused(tmp_path / "remote", "own code", kind="captioner")
    refused(tagger, "has no config.json", kind="captioner")
    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "config.json").write_text(json.dumps({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}))
    refused(tmp_path / "vqa", "is a BlipForQuestionAnswering, not a caption model", kind="captioner")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps({"model_type": "git"}))
    refused(tmp_path / "no_weights", "Cannot load the caption model in .*no_weights", kind="captioner")
    # a model file named directly works, and a broken folder never leaves a half-run behind
    summary, _ = run(data, tagger / "model.onnx")
    assert summary.created == 1


def test_hub_ids_are_found_in_kohyas_layout_and_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    data = colour_dataset(tmp_path / "data", {"red": RED})
    kohya_tagger(tmp_path / "models")
    summary, _ = run(data, REPO_ID, model_dirs=[tmp_path / "models"], mode="overwrite")
    assert summary.created == 1 and (data / "red.txt").read_text().strip() == RED_TAGS
    cache = tmp_path / "hub"
    snapshot = cache / "models--Owner--cached-tagger" / "snapshots" / ("a" * 40)
    build_tagger(snapshot)
    (cache / "models--Owner--cached-tagger" / "refs").mkdir()
    (cache / "models--Owner--cached-tagger" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    model = load_model(CaptionOptions(kind="wd14", model="Owner/cached-tagger", model_dirs=[tmp_path / "models"]))
    assert model.folder == snapshot


@pytest.mark.parametrize("kind", ["blip", "git", "blip-2"])
def test_caption_models_write_their_text_with_prefix_and_suffix(tmp_path, kind):
    import torch
    import transformers

    folder = build_caption_model(tmp_path / kind, kind)
    data = colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE})
    text = TextOptions(max_length=6, min_length=2, num_beams=2, prefix="photo of ", suffix="tail")
    options = CaptionOptions(kind="captioner", model=str(folder), mode="overwrite", batch_size=2, text=text)
    model = load_model(options)
    events = list(caption_dataset(data, options, model=model))
    assert model.model is None  # freed at the end
    start = next(e for e in events if isinstance(e, CaptionStart))
    assert start.device == "cpu" and start.to_caption == 2
    # what the same model says when called directly, with the same generation settings
    processor = transformers.AutoProcessor.from_pretrained(folder)
    direct = getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0]).from_pretrained(folder)
    images = [Image.open(data / f"{n}.png").convert("RGB") for n in ("blue", "red")]
    with torch.no_grad():
        ids = direct.eval().generate(**processor(images=images, return_tensors="pt"), max_new_tokens=6, min_new_tokens=2, num_beams=2)
    for name, said in zip(("blue", "red"), processor.batch_decode(ids, skip_special_tokens=True)):
        assert said.strip()
        assert (data / f"{name}.txt").read_text().strip() == f"photo of {' '.join(said.split())}, tail"


def test_cli_caption_end_to_end(tmp_path):
    models, data = tmp_path / "models", colour_dataset(tmp_path / "data", {"red": RED, "blue": BLUE})
    kohya_tagger(models)
    (data / "blue.txt").write_text("kept\n")
    proc = run_cli("caption", data, "--wd14", REPO_ID, "--model-dir", models, "--dry-run")
    assert "red.txt: '' -> 'hatsune miku, red background, ^_^'" in proc.stdout and not (data / "red.txt").exists()
    proc = run_cli("caption", data, "--wd14", models / REPO_ID.replace("/", "_"), "--mode", "skip", "--batch-size", "1")
    assert "captioned 1 of 2 images" in proc.stdout and "1 skipped" in proc.stdout
    assert "top tags: hatsune miku (1), red background (1), ^_^ (1)" in proc.stdout
    assert "img" in proc.stderr  # the progress bar
    assert (data / "red.txt").read_text().strip() == RED_TAGS and (data / "blue.txt").read_text() == "kept\n"
    proc = run_cli("caption", data, "--undo")
    assert "1 removed" in proc.stdout and not (data / "red.txt").exists()
    (models / "broken").mkdir()
    (models / "broken" / "model.onnx").write_bytes((models / REPO_ID.replace("/", "_") / "model.onnx").read_bytes())
    (models / "broken" / "selected_tags.csv").write_text("name\nx\n")
    proc = run_cli("caption", data, "--wd14", models / "broken", check=False)
    assert proc.returncode == 2 and "broken/selected_tags.csv" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("caption", data, "--wd14", models / "broken", "--threshold", "2", check=False)
    assert proc.returncode == 2 and "threshold: must be between 0 and 1" in proc.stderr
    proc = run_cli("caption", data, "--undo", "--wd14", "x", check=False)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = run_cli("caption", data / "missing", "--wd14", models / REPO_ID.replace("/", "_"), check=False)
    assert proc.returncode == 2 and "is not a folder. Give the dataset folder" in proc.stderr and "--data" not in proc.stderr


def test_cuda_is_refused_with_a_sentence_where_there_is_none(tagger):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # a GPU build: auto must pick CUDA
        model = load_model(CaptionOptions(kind="wd14", model=str(tagger)))
        model.load()
        assert model.device == "cuda"
        return
    model = load_model(CaptionOptions(kind="wd14", model=str(tagger), device="cuda"))
    with pytest.raises(CaptioningError, match="no CUDA provider"):
        model.load()


def test_caption_speed_benchmark_runs_and_reports(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "caption_speed.py"), "--images", "4", "--batch-size", "2",
                           "--size", "64", "--json"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 4 and result["size"] == 64 and result["device"] == "cpu"
    assert result["end_to_end_images_per_s"] > 0 and result["model_images_per_s"] > 0
