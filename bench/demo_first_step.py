"""Time to the first training step of the offline demo, as a new user starts it (`python -m sdlora train --config
presets/demo.toml`), with an empty cache (first use: builtin:toy unpacked, the demo set drawn) and again with a warm
one; and the whole run's time.

    python bench/demo_first_step.py [--preset presets/demo-navy.toml] [--steps N] [--json demo.json]

The first step is the moment `OUTPUT/train_log.jsonl` gets its first line (the file is written once per step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(cache: Path, out: Path, preset: Path, steps: int | None) -> dict:
    env = {**os.environ, "SDLORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    log = out / "train_log.jsonl"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sdlora", "train", "--config", str(preset), "--output", str(out), "--quiet"]
    proc = subprocess.Popen(cmd + (["--steps", str(steps)] if steps else []), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and log.is_file() and log.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.02)
    total = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the demo failed (exit {proc.returncode}):\n{stderr}")
    return {"first_step_s": round(first if first is not None else total, 2), "total_s": round(total, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", type=Path, default=ROOT / "presets" / "demo.toml")
    p.add_argument("--steps", type=int, help="default: the preset's own")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = {"preset": str(args.preset), "steps": args.steps or "the preset's",
             "cold": run_demo(tmp / "cache", tmp / "cold", args.preset, args.steps),
             "warm": run_demo(tmp / "cache", tmp / "warm", args.preset, args.steps)}
    for name in ("cold", "warm"):
        print(f"{args.preset.name}, {name} cache: first step after {r[name]['first_step_s']:.2f} s, {r['steps']} steps "
              f"done in {r[name]['total_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
