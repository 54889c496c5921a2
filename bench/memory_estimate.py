"""sdlora's memory estimate for full-size SD1.5 / SD2 UNets at the usual settings, without a GPU or any weights.

Each row traces one LoRA training step on fake tensors (sdlora.memory.trace_step_bytes) and adds the frozen
UNet weights in the compute dtype and the LoRA parameters with gradients and AdamW state: the GPU memory a run
needs with cached latents and text embeddings (VAE and frozen text encoder off the GPU), before CUDA's own
context and allocator slack.

    python bench/memory_estimate.py
    python bench/memory_estimate.py --json estimates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdlora  # noqa: E402,F401  (first: it quiets libraries that log on import)

ROWS = [  # (model, resolution, mixed precision, gradient checkpointing, batch)
    ("sd15", 512, "bf16", False, 1), ("sd15", 512, "bf16", True, 1), ("sd15", 512, "bf16", False, 2),
    ("sd15", 512, "bf16", True, 4), ("sd15", 768, "bf16", False, 1), ("sd15", 512, "no", False, 1),
    ("sd15", 256, "no", False, 1), ("sd2-v", 768, "bf16", False, 1), ("sd2-v", 768, "bf16", True, 1),
]


def main(argv=None) -> int:
    from diffusers import UNet2DConditionModel

    from sdlora.config import make_config
    from sdlora.lora import count_lora_parameters, resolve_unet_targets
    from sdlora.memory import trace_step_bytes
    from sdlora.model_configs import MODEL_CONFIGS
    from sdlora.models import quiet_libraries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attn")
    p.add_argument("--json")
    args = p.parse_args(argv)
    quiet_libraries()
    gib, rows = 1024 ** 3, []
    print(f"LoRA rank {args.rank} on '{args.targets}', AdamW; GiB")
    print(f"{'model':<7} {'px':>5} {'prec':>5} {'ckpt':>5} {'batch':>5} {'weights':>8} {'LoRA':>6} {'step':>6} {'total':>6} {'trace s':>8}")
    for model, res, prec, ckpt, batch in ROWS:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(MODEL_CONFIGS[model]["unet"])
        cfg = make_config(base_model="bench", data_dir="bench", rank=args.rank, alpha=args.rank, targets=[args.targets],
                          resolution=res, mixed_precision=prec, gradient_checkpointing=ckpt, batch_size=batch)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        weights = sum(p.numel() for p in unet.parameters()) * dtype.itemsize
        lora = count_lora_parameters(resolve_unet_targets(unet, cfg.targets), args.rank) * 16
        t0 = time.perf_counter()
        step = trace_step_bytes(unet, config=cfg, compute_dtype=dtype, height=res, width=res)
        took = time.perf_counter() - t0
        total = weights + lora + step
        rows.append(dict(model=model, resolution=res, precision=prec, gradient_checkpointing=ckpt, batch=batch,
                         weights_gib=weights / gib, lora_gib=lora / gib, step_gib=step / gib, total_gib=total / gib, trace_s=took))
        print(f"{model:<7} {res:>5} {prec:>5} {'yes' if ckpt else 'no':>5} {batch:>5} {weights / gib:>8.2f} {lora / gib:>6.3f} "
              f"{step / gib:>6.2f} {total / gib:>6.2f} {took:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
