"""Peak memory of `python -m sdlora verify` against loading the same base model once, on SD1.5- and SDXL-shaped bases.

The base is written as a diffusers folder with the family's real shapes, random weights, fp16 on disk (as users
download them); the LoRA is a random rank-16 file in kohya's module set (every transformer Linear / 1x1 conv and every
text-encoder attention/MLP layer). Each measured step runs in its own process, so its peak RSS is its own.

    python bench/verify_memory.py                       # SD1.5 shapes (~2 GB folder, ~6 GB RAM)
    python bench/verify_memory.py --model sdxl          # SDXL shapes (6.5 GB folder, ~16 GB RAM)
    python bench/verify_memory.py --keep /tmp/vm        # keep (and reuse) the folder and the file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(model: str, folder: Path, rank: int) -> None:
    """The base folder (fp16) and the LoRA file, unless they are there already."""
    import torch

    from tools_speed import kohya_modules, random_lora
    from train_speed import build_random

    if (folder / "base" / "model_index.json").is_file() and (folder / "lora.safetensors").is_file():
        return
    base = build_random(model, "cpu", torch.float32)
    random_lora(base, folder / "lora.safetensors", rank, 0, 1)
    print(f"LoRA: {len(kohya_modules(base, conv=False))} modules at rank {rank}", flush=True)
    pipe = base.make_pipeline()
    for name in ("unet", "vae", *base.family.text_encoder_names):
        getattr(pipe, name).half()
    pipe.save_pretrained(str(folder / "base"), safe_serialization=True)


def step(kind: str, folder: Path) -> dict:
    """One measured step in this process: 'load' the base, or 'verify' the file against it (as the CLI does)."""
    if kind == "load":
        from sdlora.models import load_base_model

        load_base_model(str(folder / "base"))
        ok = True
    else:
        from sdlora.cli import main

        ok = main(["verify", str(folder / "lora.safetensors"), "--base-model", str(folder / "base")]) == 0
    return {"step": kind, "peak_rss_mib": round(_peak_mib()), "ok": ok}


def _run_step(kind: str, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", kind, "--keep", str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0 and not proc.stdout.strip():
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--keep", help="folder for the base and the file (default: a temporary one)")
    p.add_argument("--step", choices=["load", "verify"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="sdlora-verify-bench-"))
    if args.step:
        print(json.dumps(step(args.step, folder)))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'bench')]!r}; "
                    f"from verify_memory import build; from pathlib import Path; "
                    f"build({args.model!r}, Path({str(folder)!r}), {args.rank})"], check=True)
    disk = sum(f.stat().st_size for f in (folder / "base").rglob("*") if f.is_file()) / 2**30
    load, verify = _run_step("load", folder), _run_step("verify", folder)
    ratio = verify["peak_rss_mib"] / load["peak_rss_mib"]
    print(f"{args.model}: base folder {disk:.1f} GiB (fp16), LoRA {(folder / 'lora.safetensors').stat().st_size / 2**20:.0f} MiB")
    print(f"  load the base once (fp32):  peak RSS {load['peak_rss_mib']:>7} MiB")
    print(f"  verify the LoRA against it: peak RSS {verify['peak_rss_mib']:>7} MiB  ({ratio:.2f}x)  "
          f"{'OK' if verify['ok'] else 'FAILED'}")
    return 0 if verify["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
