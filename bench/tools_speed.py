"""Run times of the LoRA tools (resize, combine, merge, extract) on SD1.5-shaped files.

The base model has SD1.5's real shapes (`sdlora/models/component_configs.py`) and random weights; the LoRAs are random LoCon
files in kohya's module set (every transformer Linear/1x1 conv and text-encoder attention/MLP at --rank, every
ResNet/down/upsampler 3x3 conv at --conv-rank). Each tool runs once, through the library, writing real files.

    python bench/tools_speed.py                   # SD1.5 shapes, rank 32 / conv 16 (needs ~12 GB RAM)
    python bench/tools_speed.py --model tiny      # builtin:tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def base_model(name: str):
    if name == "tiny":
        from sdlora.models import load_base_model

        return load_base_model("builtin:tiny")
    from train_speed import build_random

    return build_random(name, "cpu", torch.float32)


def kohya_modules(base, conv: bool) -> dict[str, tuple]:
    """prefix -> weight shape of kohya's LoCon module set (the set extract uses)."""
    from sdlora.tools.extract import _RESNET, _TRANSFORMER
    from sdlora.formats.lora_file import module_index

    comps = base.components()
    out = {}
    for prefix, (component, path) in module_index(base.family, comps).items():
        if component == "unet" and not (_TRANSFORMER.search(path) or (conv and _RESNET.search(path))):
            continue
        out[prefix] = tuple(comps[component].get_submodule(path).weight.shape)
    return out


def random_lora(base, path: Path, rank: int, conv_rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, shape in kohya_modules(base, conv=conv_rank > 0).items():
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        r = conv_rank if conv3 else rank
        kernel = shape[2:] if len(shape) == 4 else ()
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn((r, shape[1], *kernel), generator=g) * 0.02).half()
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn((shape[0], r, *([1, 1] if kernel else [])), generator=g)
                                               * 0.02).half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(r) / 2).half()
    md = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
          "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank / 2)}),
          **base.family.metadata("epsilon")}
    save_file(tensors, str(path), metadata=md)
    return path


def timed(label: str, results: dict, fn):
    start = time.perf_counter()
    value = fn()
    results[label] = round(time.perf_counter() - start, 2)
    print(f"{label:45s} {results[label]:8.2f} s", flush=True)
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--conv-rank", type=int, default=16)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--keep", help="write the files into this folder (default: a temporary one)")
    args = p.parse_args(argv)
    with torch.no_grad():
        return _run(args)


def _run(args) -> int:
    from sdlora.models import load_base_model
    from sdlora.tools import combine_loras, extract_lora, merge_loras, resize_lora

    folder = Path(args.keep or tempfile.mkdtemp(prefix="sdlora-tools-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    r = {"model": args.model, "rank": args.rank, "conv_rank": args.conv_rank, "threads": torch.get_num_threads()}
    base = timed("build base model (random weights)", r, lambda: base_model(args.model))
    a = random_lora(base, folder / "a.safetensors", args.rank, args.conv_rank, 1)
    b = random_lora(base, folder / "b.safetensors", args.rank, args.conv_rank, 2)
    r["lora_modules"] = len(kohya_modules(base, conv=True))
    r["lora_file_mib"] = round(a.stat().st_size / 2**20, 1)
    print(f"LoRA files: {r['lora_modules']} modules, {r['lora_file_mib']} MiB each (fp16)")
    half = max(1, args.rank // 4)
    timed(f"resize to rank {half}", r, lambda: resize_lora(a, folder / "r.safetensors", rank=half))
    timed("resize sv_fro 0.9", r, lambda: resize_lora(a, folder / "rf.safetensors", rank=args.rank, method="sv_fro",
                                                      param=0.9))
    timed("combine 2 LoRAs, exact (concat)", r, lambda: combine_loras([(a, 0.6), (b, 0.4)], folder / "c.safetensors"))
    timed(f"combine 2 LoRAs, SVD to rank {args.rank}", r,
          lambda: combine_loras([(a, 0.6), (b, 0.4)], folder / "cs.safetensors", mode="svd", rank=args.rank))
    merged = timed("merge 2 LoRAs into a checkpoint (fp16 file)", r,
                   lambda: merge_loras(base, [(a, 0.8), (b, 0.5)], folder / "merged.safetensors", precision="fp16"))
    r["checkpoint_mib"] = round(merged.path.stat().st_size / 2**20, 1)
    tuned = timed("load the merged checkpoint (sdlora)", r, lambda: load_base_model(str(merged.path)))
    # The checkpoint is fp16, so every weight differs from the fp32 base by rounding: min_diff skips no module there,
    # and extract does the full work (SVD of every module of the set).
    ex = timed(f"extract rank {args.rank} / conv {args.conv_rank}", r,
               lambda: extract_lora(tuned, base, folder / "x.safetensors", rank=args.rank, conv_rank=args.conv_rank))
    r["extract_modules"] = len(ex.modules)
    print(f"checkpoint {r['checkpoint_mib']} MiB; extract: {r['extract_modules']} modules")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
