"""Time to the first training step of the offline demo, as a new user starts it (`python -m sdlora train --config
presets/demo.toml`), with an empty cache (first use: builtin:toy unpacked, the demo set drawn) and again with a warm
one; and the whole run's time.

    python bench/demo_first_step.py [--steps 600] [--json demo.json]

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


def run_demo(cache: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "SDLORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    log = out / "train_log.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sdlora", "train", "--config", str(ROOT / "presets" / "demo.toml"),
                             "--output", str(out), "--steps", str(steps), "--quiet"], cwd=ROOT, env=env,
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
    p.add_argument("--steps", type=int, default=600, help="the preset's 600 by default")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = {"steps": args.steps, "cold": run_demo(tmp / "cache", tmp / "cold", args.steps),
             "warm": run_demo(tmp / "cache", tmp / "warm", args.steps)}
    for name in ("cold", "warm"):
        print(f"{name} cache: first step after {r[name]['first_step_s']:.2f} s, {args.steps} steps done in "
              f"{r[name]['total_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
