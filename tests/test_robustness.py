"""Nothing lost: kill -9 at any point resumes to the same weights; NaN steps are caught; disk-full keeps the last checkpoint."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env, tiny_config
from sdlora.config.train_config import make_config
from sdlora.formats.lora_file import read_lora
from sdlora.training.trainer import Trainer, TrainingError, train

STEPS, SAVE_EVERY = 12, 3


def _train_cmd(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "sdlora", "train", "--base-model", "builtin:tiny", "--data", str(data), "--output", str(out),
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--rank", "4", "--resolution", "64", "--batch-size", "2",
            "--lr", "1e-3", "--seed", "11", "--save-precision", "fp32", "--quiet", *extra]


def _log_lines(out: Path) -> int:
    try:
        return len((out / "train_log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_dataset):
    out = tmp_path_factory.mktemp("full")
    subprocess.run(_train_cmd(demo_dataset, out), cwd=ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    return read_lora(out / "lora.safetensors")[0]


@pytest.mark.slow  # CLI trainings in subprocesses, killed and resumed
@pytest.mark.parametrize("kill_after_steps", [1, 5, 10])
def test_kill_9_then_resume_gives_same_weights(tmp_path, demo_dataset, uninterrupted, kill_after_steps):
    out = tmp_path / "run"
    env = subprocess_env()
    env["SDLORA_STEP_DELAY"] = "0.15"  # slow the steps so the kill lands mid-run
    proc = subprocess.Popen(_train_cmd(demo_dataset, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _log_lines(out) < kill_after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "lora.safetensors").exists() or kill_after_steps >= STEPS
    # whatever is under a real name is complete and loadable
    for f in out.rglob("*.safetensors"):
        read_lora(f)
    resumed = subprocess.run(_train_cmd(demo_dataset, out, "--resume", "latest") if any((out / "checkpoints").glob("step*"))
                             else _train_cmd(demo_dataset, out), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    final = Path(resumed.stdout.strip().splitlines()[-1])
    tensors, md = read_lora(final)
    assert md["ss_steps"] == str(STEPS)
    assert tensors.keys() == uninterrupted.keys()
    for k in tensors:
        torch.testing.assert_close(tensors[k], uninterrupted[k], atol=1e-6, rtol=1e-5, msg=k)


_config = partial(tiny_config, steps=8, rank=4, save_every=2, seed=3)


def test_single_nan_step_is_skipped_and_reported(tmp_path, demo_dataset, monkeypatch):
    original = Trainer._loss

    def flaky(self, latents, hidden, step, micro, *rest):
        loss = original(self, latents, hidden, step, micro, *rest)
        return loss * float("nan") if step == 3 else loss

    monkeypatch.setattr(Trainer, "_loss", flaky)
    events = []
    result = train(_config(tmp_path, demo_dataset), on_event=events.append)
    warnings = [e for e in events if e.kind == "warning" and "NaN" in e.data["message"]]
    assert len(warnings) == 1 and warnings[0].step == 4
    assert result.lora_path.is_file()
    tensors, _ = read_lora(result.lora_path)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_repeated_nan_stops_with_cause_and_keeps_checkpoint(tmp_path, demo_dataset, monkeypatch):
    original = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, l, h, step, m, *rest: original(self, l, h, step, m, *rest) * (float("nan") if step >= 4 else 1.0))
    with pytest.raises(TrainingError, match="learning rate") as info:
        train(_config(tmp_path, demo_dataset))
    assert "fp16" in str(info.value)
    ckpts = sorted((tmp_path / "checkpoints").glob("step*"))
    assert [c.name for c in ckpts] == ["step000002", "step000004"]
    read_lora(ckpts[-1] / "lora.safetensors")


def test_disk_full_while_checkpointing_keeps_previous(tmp_path, demo_dataset, monkeypatch):
    import sdlora.training.checkpoints as ck

    real = ck.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full_disk)
    events = []
    result = train(_config(tmp_path, demo_dataset, steps=6), on_event=events.append)
    assert any(e.kind == "warning" and "No space left" in e.data["message"] for e in events)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step000002"]  # the failed ones left no partial folder behind
    assert result.lora_path.is_file()


def test_training_run_survives_bad_files(tmp_path):
    from PIL import Image

    root = tmp_path / "d"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (50 * i, 80, 120)).save(root / f"ok{i}.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(root / "trunc.png")
    (root / "trunc.png").write_bytes((root / "trunc.png").read_bytes()[:60])
    events = []
    result = train(make_config(base_model="builtin:tiny", data_dir=str(root), output_dir=str(tmp_path / "o"), steps=3, rank=2,
                               resolution=64, batch_size=4), on_event=events.append)
    assert result.lora_path.is_file()
    assert any("skipped" in e.data.get("message", "") for e in events if e.kind == "status")
