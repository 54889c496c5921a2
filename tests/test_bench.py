"""The speed benchmark runs end to end (on builtin:tiny) and reports what README and bench/RESULTS.md describe."""

from __future__ import annotations

import json
import subprocess

import pytest
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env


@pytest.mark.slow  # a subprocess training and its timing runs: about 40 s each on 2 cores
@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_train_speed_benchmark_runs_and_reports(tmp_path, model):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--model", model, "--steps", "2",
                           "--json", str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sdlora/floor =" in proc.stdout and "memory estimate: one step" in proc.stdout
    r = json.loads(Path(out).read_text())
    loops = ("floor", "sdlora", "naive")
    assert all(len(r["all_step_times"][n]) == 2 and r["seconds_per_step"][n] > 0 for n in loops)
    assert r["sdlora_over_floor"] > 0 and r["naive_over_sdlora"] > 0
    assert 0 <= r["sdlora_data_wait_s_median"] < r["seconds_per_step"]["sdlora"]
    assert set(r["peak_memory"]) == set(loops)
    sd = r["peak_memory"]["sdlora"]
    assert abs(sd["estimate_step_mib"] - sd["measured_step_mib"]) <= 0.05 * sd["measured_step_mib"]
    assert 0 < r["mfu_sdlora"] < 1


def test_tools_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tools_speed.py"), "--model", "tiny", "--rank", "4",
                           "--conv-rank", "2", "--json", str(out), "--keep", str(tmp_path / "files")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    timings = [k for k in r if " " in k]  # the labels the table prints, e.g. "resize sv_fro 0.9"
    assert len(timings) == 8 and all(r[k] > 0 for k in timings)
    assert r["extract_modules"] == r["lora_modules"] > 0  # fp16 rounding changes every module of the set
    assert "extract rank 4 / conv 2" in proc.stdout
