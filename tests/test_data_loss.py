"""A finished training is never lost, and one bad thing does not end a run.

Full disks are real where the machine allows it (a small tmpfs, as root) and otherwise raise the exception types the
libraries really raise (torch.save: RuntimeError, safetensors: SafetensorError), not a friendly OSError.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conftest import ROOT, subprocess_env, tiny_config
from sdlora.config.train_config import ConfigError
from sdlora.formats.lora_file import read_lora
from sdlora.outputs import LOCK_NAME, OutputError, output_lock
from sdlora.training.resume import CheckpointError
from sdlora.training.trainer import TrainingError, train


_config = partial(tiny_config, steps=6, rank=2, seed=5, save_precision="fp32")


def _warnings(events, text=""):
    return [e.data["message"] for e in events if e.kind == "warning" and text in e.data["message"]]


def _same_weights(a: Path, b: Path):
    ta, _ = read_lora(a)
    tb, _ = read_lora(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-5, msg=k)


# previews ----------------------------------------------------------------------------------------------------------

def test_failing_final_preview_is_a_warning_and_the_lora_is_written(tmp_path, demo_dataset, monkeypatch):
    import sdlora.training.previews as previews

    def overflow(*a, **k):
        raise ValueError("Overflow when unpacking long long")  # what torch said for a huge --d seed

    monkeypatch.setattr(previews, "generate", overflow)
    events = []
    result = train(_config(tmp_path, demo_dataset, sample_prompts=["a cat"], sample_every=3), on_event=events.append)
    assert result.lora_path.is_file() and read_lora(result.lora_path)[1]["ss_steps"] == "6"
    msgs = _warnings(events, "Preview at step")
    assert len(msgs) == 2 and "Overflow" in msgs[-1]  # step 3 and the final one
    assert [e.kind for e in events][-1] == "done"


def test_out_of_range_sample_seed_is_refused_before_training(tmp_path, demo_dataset):
    with pytest.raises(ConfigError, match=r"Sample prompt 'a cat --d 99999999999999999999'.*0 to 4294967295"):
        train(_config(tmp_path, demo_dataset, sample_prompts=["a cat --d 99999999999999999999"]))
    assert not (tmp_path / "train_log.jsonl").exists()


# full disk ---------------------------------------------------------------------------------------------------------

def test_checkpoint_write_failures_with_real_exception_types_keep_the_previous_one(tmp_path, demo_dataset, monkeypatch):
    import sdlora.training.checkpoints as ck

    real_save_file, real_torch_save = ck.save_file, ck.torch.save
    calls = {"st": 0, "pt": 0}

    def save_file_full(tensors, path, *a, **k):
        calls["st"] += 1
        if calls["st"] == 2:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        return real_save_file(tensors, path, *a, **k)

    def torch_save_full(obj, path, *a, **k):
        calls["pt"] += 1
        if calls["pt"] == 2:  # step 2 saved; step 4 failed before torch.save; step 6 fails here
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1536 vs 1472")
        return real_torch_save(obj, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", save_file_full)
    monkeypatch.setattr(ck.torch, "save", torch_save_full)
    events = []
    result = train(_config(tmp_path, demo_dataset, steps=8, save_every=2), on_event=events.append)
    failed = _warnings(events, "Could not save checkpoint")
    assert [m.split(":")[0] for m in failed] == ["Could not save checkpoint at step 4", "Could not save checkpoint at step 6"]
    assert "SafetensorError" in failed[0] and "RuntimeError" in failed[1] and "previous checkpoint is kept" in failed[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step000002"]
    assert result.lora_path == tmp_path / "lora.safetensors" and result.lora_path.is_file()


def test_final_export_failure_saves_the_lora_elsewhere_and_says_where(tmp_path, demo_dataset, monkeypatch):
    import sdlora.formats.export as export_mod

    out = tmp_path / "run"
    real = export_mod.save_file

    def refuse_in_out(tensors, path, *a, **k):
        if Path(path).resolve().is_relative_to(out.resolve()):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(export_mod, "save_file", refuse_in_out)
    events = []
    result = train(_config(out, demo_dataset, steps=4), on_event=events.append)
    assert result.lora_path.is_file() and not (out / "lora.safetensors").exists()
    assert result.lora_path.parent.name == "rescued"
    msg = _warnings(events, "Could not write the LoRA")
    assert len(msg) == 1 and str(out / "lora.safetensors") in msg[0] and str(result.lora_path) in msg[0]
    assert read_lora(result.lora_path)[1]["ss_steps"] == "4"
    done = [e for e in events if e.kind == "done"]
    assert done and done[0].data["path"] == str(result.lora_path)


def test_a_folder_where_the_lora_goes_is_not_replaced(tmp_path, demo_dataset):
    out = tmp_path / "run"
    (out / "lora.safetensors").mkdir(parents=True)
    events = []
    result = train(_config(out, demo_dataset, steps=2), on_event=events.append)
    assert (out / "lora.safetensors").is_dir()
    assert result.lora_path.is_file() and "is a folder" in _warnings(events, "Could not write the LoRA")[0]


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB file system (tmpfs), or skip where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "ab") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _fill_after_first_checkpoint(out: Path, events: list):
    def on_event(e):
        events.append(e)
        if e.kind == "checkpoint" and not (out / "filler").exists():
            _fill(out)
    return on_event


def test_real_full_disk_checkpoint_fails_and_lora_is_rescued(small_disk, demo_dataset):
    out = small_disk / "run"
    events = []
    result = train(_config(out, demo_dataset, steps=6, save_every=2), on_event=_fill_after_first_checkpoint(out, events))
    assert any("disk is full" in m for m in _warnings(events, "Could not save checkpoint at step 4"))
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step000002"]
    assert not list((out / "checkpoints").glob(".step*"))  # failed temp folders are cleaned up
    rescued = _warnings(events, "Could not write the LoRA")
    assert rescued and "disk is full" in rescued[0]
    assert result.lora_path.is_file() and not result.lora_path.is_relative_to(small_disk)
    assert read_lora(result.lora_path)[1]["ss_steps"] == "6"


def test_real_full_disk_everywhere_names_the_path_and_the_checkpoint(small_disk, demo_dataset, monkeypatch):
    import sdlora.paths

    out = small_disk / "run"
    monkeypatch.setattr(sdlora.paths, "cache_dir", lambda: small_disk / "cache")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(small_disk / "tmp"))
    events = []
    with pytest.raises(TrainingError) as info:
        train(_config(out, demo_dataset, steps=6, save_every=2), on_event=_fill_after_first_checkpoint(out, events))
    msg = str(info.value)
    assert str(out / "lora.safetensors") in msg and "disk is full" in msg
    assert str(out / "checkpoints" / "step000002") in msg and "--resume latest" in msg
    assert (out / "checkpoints" / "step000002" / "lora.safetensors").is_file()


def test_disk_full_while_writing_the_step_log_is_a_warning(tmp_path, demo_dataset, monkeypatch):
    import builtins

    real_open = builtins.open

    def full_log(file, mode="r", *a, **k):
        if str(file).endswith("train_log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_log)
    events = []
    result = train(_config(tmp_path, demo_dataset, steps=3), on_event=events.append)
    assert result.lora_path.is_file() and len(_warnings(events, "train_log.jsonl")) == 1


# images that fail mid-run ----------------------------------------------------------------------------------------------

def _dataset_with_late_failure(root: Path, monkeypatch) -> Path:
    """Four good images and a "large" GIF cut in half. The scan reads large non-JPEGs by their headers only (GIF has no
    checksums to verify), so the damage shows when training decodes it. "Large" is lowered to keep the test fast."""
    import numpy as np

    import sdlora.data.scan as scan_mod

    monkeypatch.setattr(scan_mod, "_DECODE_CHECK_PIXELS", 10_000)
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 100, 30 * i)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"image number {i}")
    noise = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)
    Image.fromarray(noise, "L").save(root / "big.gif")
    data = (root / "big.gif").read_bytes()
    (root / "big.gif").write_bytes(data[: len(data) // 2])
    (root / "big.txt").write_text("the broken one")
    return root


@pytest.mark.parametrize("cache_latents", [True, False])
def test_image_that_fails_to_decode_is_skipped_and_resume_stays_exact(tmp_path, monkeypatch, cache_latents):
    data = _dataset_with_late_failure(tmp_path / "data", monkeypatch)
    common = dict(steps=8, save_every=4, cache_latents=cache_latents, random_flip=True, shuffle_tags=True, batch_size=2)
    events = []
    full = train(_config(tmp_path / "full", data, **common), on_event=events.append)
    skipped = _warnings(events, "big.gif")
    assert len(skipped) == 1 and "cannot be read any more" in skipped[0] and "img0.png instead" in skipped[0]

    stop = threading.Event()
    part = train(_config(tmp_path / "part", data, **common), stop_event=stop,
                 on_event=lambda e: stop.set() if e.kind == "checkpoint" and e.step == 4 else None)
    assert part.stopped_early and part.steps == 4
    resumed = train(_config(tmp_path / "part", data, resume="latest", **common))
    _same_weights(full.lora_path, resumed.lora_path)


def test_image_deleted_mid_run_is_skipped_with_a_warning(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 100, 30)).save(data / f"img{i}.png")
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "step" and e.step == 1:
            (data / "img2.png").unlink()
            (data / "img3.png").write_bytes((data / "img1.png").read_bytes()[:40])  # truncated in place

    result = train(_config(tmp_path / "o", data, steps=6, batch_size=1, cache_latents=False), on_event=on_event)
    assert result.lora_path.is_file() and result.steps == 6
    assert {Path(m.split()[1]).name for m in _warnings(events, "cannot be read any more")} == {"img2.png", "img3.png"}


def test_every_image_failing_ends_the_run_with_a_sentence(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (90 * i, 100, 30)).save(data / f"img{i}.png")
    from sdlora.data.scan import DatasetError

    def on_event(e):
        if e.kind == "start":
            for p in data.glob("*.png"):
                p.unlink()

    with pytest.raises(DatasetError, match="No readable images left"):
        train(_config(tmp_path / "o", data, steps=3, batch_size=1, cache_latents=False), on_event=on_event)


# output folders ------------------------------------------------------------------------------------------------------

def test_output_folder_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, demo_dataset):
    out = tmp_path / "run"
    with output_lock(out):
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(OutputError, match=r"is in use by another run in this program"):
            train(_config(out, demo_dataset, steps=2))
    assert not (out / LOCK_NAME).exists()
    # a lock file left by a process that died (kill -9): taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": "x", "started": 0}))
    result = train(_config(out, demo_dataset, steps=2))
    assert result.lora_path.is_file() and not (out / LOCK_NAME).exists()


def test_two_cli_runs_into_one_folder(tmp_path, demo_dataset):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdlora", "train", "--base-model", "builtin:tiny", "--data", str(demo_dataset), "--output",
           str(out), "--steps", "200", "--rank", "2", "--resolution", "64", "--quiet"]  # killed once the second run is refused
    env = subprocess_env()
    env["SDLORA_STEP_DELAY"] = "0.3"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "train_log.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"in use by another sdlora run (process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()


# resume ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, demo_dataset):
    """A run with checkpoints at steps 2, 4 and 6 (stopped at 6 of 10), and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("ckpt")
    full = train(_config(root / "full", demo_dataset, steps=10, save_every=2))
    stop = threading.Event()
    train(_config(root / "part", demo_dataset, steps=10, save_every=2), stop_event=stop,
          on_event=lambda e: stop.set() if e.kind == "checkpoint" and e.step == 6 else None)
    return root / "part", full.lora_path


def _damage(ckpt: Path, how: str) -> None:
    if how == "truncated lora_state":
        data = (ckpt / "lora_state.safetensors").read_bytes()
        (ckpt / "lora_state.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "state not JSON":
        (ckpt / "state.json").write_text("{ this is not json")
    elif how == "wrong step":
        state = json.loads((ckpt / "state.json").read_text())
        state["step"] = 999
        (ckpt / "state.json").write_text(json.dumps(state))
    elif how == "other rank":
        tensors = load_file(ckpt / "lora_state.safetensors")
        save_file({k: torch.cat([v, v]) if ".lora_A." in k else (torch.cat([v, v], 1) if ".lora_B." in k else v)
                   for k, v in tensors.items()}, ckpt / "lora_state.safetensors")
    elif how == "no LoRA keys":
        save_file({"something.else": torch.zeros(2)}, ckpt / "lora_state.safetensors")
    elif how == "NaN weights":
        tensors = load_file(ckpt / "lora_state.safetensors")
        k = next(iter(tensors))
        tensors[k] = tensors[k].clone().fill_(float("nan"))
        save_file(tensors, ckpt / "lora_state.safetensors")
    elif how == "truncated training_state":
        data = (ckpt / "training_state.pt").read_bytes()
        (ckpt / "training_state.pt").write_bytes(data[:100])
    elif how == "missing state.json":
        (ckpt / "state.json").unlink()


DAMAGES = ["truncated lora_state", "state not JSON", "wrong step", "other rank", "no LoRA keys", "NaN weights",
           "truncated training_state", "missing state.json"]


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_latest_skips_a_damaged_checkpoint_and_says_so(tmp_path, checkpointed, demo_dataset, how):
    from sdlora.training.trainer import Trainer

    part, _ = checkpointed
    out = tmp_path / "run"
    shutil.copytree(part, out)
    _damage(out / "checkpoints" / "step000006", how)
    events = []
    trainer = Trainer(_config(out, demo_dataset, steps=10, save_every=2, resume="latest"), on_event=events.append)
    trainer.prepare()  # the resume happens here; the intact run below shows the rest
    skipped = _warnings(events, "step000006")
    assert len(skipped) == 1 and "skipped" in skipped[0], [e.data for e in events if e.kind == "warning"]
    assert any(e.kind == "status" and "Resumed from" in e.data["message"] and "step000004" in e.data["message"] for e in events)
    assert trainer.start_step == 4


def test_resume_from_intact_checkpoint_is_exact(tmp_path, checkpointed, demo_dataset):
    part, full = checkpointed
    out = tmp_path / "run"
    shutil.copytree(part, out)
    result = train(_config(out, demo_dataset, steps=10, save_every=2, resume="latest"))
    _same_weights(full, result.lora_path)


@pytest.mark.parametrize("how", ["truncated lora_state", "other rank", "wrong step", "truncated training_state"])
def test_explicit_broken_checkpoint_gives_a_sentence(tmp_path, checkpointed, demo_dataset, how):
    part, _ = checkpointed
    out = tmp_path / "run"
    shutil.copytree(part, out)
    ckpt = out / "checkpoints" / "step000004"
    _damage(ckpt, how)
    with pytest.raises(CheckpointError) as info:
        train(_config(out, demo_dataset, steps=10, resume=str(ckpt)))
    msg = str(info.value)
    assert msg.startswith(f"resume: checkpoint '{ckpt}' cannot be used: ") and "\n" not in msg
    if how == "other rank":
        assert "rank 4, this run has rank 2" in msg


def test_resume_with_other_settings_or_nothing_intact(tmp_path, checkpointed, demo_dataset):
    part, _ = checkpointed
    out = tmp_path / "run"
    shutil.copytree(part, out)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*rank 2, this run has rank 4"):
        train(_config(out, demo_dataset, steps=10, rank=4, resume="latest"))
    with pytest.raises(CheckpointError, match="train_text_encoder"):
        train(_config(out, demo_dataset, steps=10, train_text_encoder=True, resume="latest"))
    with pytest.raises(TrainingError, match="past this run's 5 steps"):
        train(_config(out, demo_dataset, steps=5, resume="latest"))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(_config(out, demo_dataset, steps=10, resume=str(out / "nowhere")))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(_config(tmp_path / "empty", demo_dataset, steps=10, resume="latest"))


# LoRA files with NaN weights -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_lora(tmp_path_factory, demo_dataset):
    root = tmp_path_factory.mktemp("nan")
    good = train(_config(root / "run", demo_dataset, steps=2)).lora_path
    tensors, md = read_lora(good)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, root / "nan.safetensors", metadata=md)
    return root / "nan.safetensors"


def test_verify_fails_a_lora_with_nan_weights(nan_lora):
    from sdlora.models import load_base_model
    from sdlora.tools.verify import verify_lora

    report = verify_lora(nan_lora, load_base_model("builtin:tiny"))
    assert not report.ok and any("NaN or infinite" in p for p in report.problems)
    assert report.summary().endswith("FAILED")


def test_generate_and_try_refuse_a_lora_with_nan_weights(nan_lora, tmp_path):
    from sdlora.inference.loras import LoraLoadError, load_loras
    from sdlora.models import load_base_model

    pipe = load_base_model("builtin:tiny").make_pipeline()
    with pytest.raises(LoraLoadError, match=rf"'{nan_lora}' is not a usable LoRA: .*NaN or infinite"):
        load_loras(pipe, [(nan_lora, 0.8)])
    assert not getattr(pipe.unet, "peft_config", None)  # nothing half-loaded into a shared pipeline
    proc = subprocess.run([sys.executable, "-m", "sdlora", "generate", "--prompt", "x", "--steps", "1", "--lora", str(nan_lora),
                           "--out", str(tmp_path / "x.png")], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "NaN or infinite" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
