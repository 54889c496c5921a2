"""Multi-process training through `accelerate launch` (2 CPU processes, gloo): sharded data, one writer, a valid LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env
from sdlora.data.scan import scan_dataset
from sdlora.models import load_base_model
from sdlora.data.training_set import TrainingSet
from sdlora.tools.verify import verify_lora


def test_batches_are_sharded_across_processes(demo_dataset):
    report = scan_dataset(demo_dataset)
    ds = TrainingSet(report.items, resolution=64, enable_buckets=False, center_crop=True, random_flip=False, seed=1)
    a = ds.batches_for_epoch(0, 2, process_index=0, num_processes=2)
    b = ds.batches_for_epoch(0, 2, process_index=1, num_processes=2)
    seen_a, seen_b = {i for x in a for i in x}, {i for x in b for i in x}
    assert len(a) == len(b) and seen_a and seen_b and not (seen_a & seen_b)


@pytest.mark.slow  # two training processes through accelerate launch
def test_accelerate_launch_two_cpu_processes(tmp_path, demo_dataset):
    env = subprocess_env()
    env["ACCELERATE_USE_CPU"] = "true"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdlora", "train", "--base-model", "builtin:tiny",
           "--data", str(demo_dataset), "--output", str(out), "--steps", "6", "--rank", "4", "--resolution", "64",
           "--batch-size", "2", "--save-every", "3", "--sample-every", "3", "--sample-prompt", "x --s 2", "--quiet",
           "--save-precision", "fp32"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == (out / "lora.safetensors").resolve()
    assert proc.stderr.count("Found ") == 1  # only the main process reports
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000003_00.png", "step000006_00.png"]
    assert (out / "checkpoints" / "step000003" / "lora.safetensors").is_file()
    report = verify_lora(out / "lora.safetensors", load_base_model("builtin:tiny"))
    assert report.ok and report.lora_effect > 0, report.summary()
