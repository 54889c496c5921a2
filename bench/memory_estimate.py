"""sdlora's memory estimate for full-size SD1.5 / SD2 / SDXL UNets at the usual settings, without a GPU or any weights.

Each row traces one LoRA training step on fake tensors (sdlora.training.memory.trace_step_bytes) and adds the frozen
UNet weights in the compute dtype and the LoRA parameters with gradients and AdamW state: the GPU memory a run
needs with cached latents and text embeddings (VAE and frozen text encoder off the GPU), before CUDA's own
context and allocator slack. Rows marked "te" train LoRA on the text encoder(s) too: their fp32 weights stay on
the GPU and run inside the step (SDXL: CLIP-L and OpenCLIP bigG).

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

ROWS = [  # (model, resolution, mixed precision, gradient checkpointing, batch, train text encoders)
    ("sd15", 512, "bf16", False, 1, False), ("sd15", 512, "bf16", True, 1, False), ("sd15", 512, "bf16", False, 2, False),
    ("sd15", 512, "bf16", True, 4, False), ("sd15", 768, "bf16", False, 1, False), ("sd15", 512, "no", False, 1, False),
    ("sd15", 256, "no", False, 1, False), ("sd2-v", 768, "bf16", False, 1, False), ("sd2-v", 768, "bf16", True, 1, False),
    ("sdxl", 1024, "bf16", False, 1, False), ("sdxl", 1024, "bf16", True, 1, False), ("sdxl", 1024, "bf16", True, 2, False),
    ("sdxl", 1024, "bf16", True, 1, True), ("sdxl", 768, "bf16", True, 1, False),
]


def _text_encoders(model: str):
    """The model's text encoders on the meta device (shapes only), in the family's order."""
    import transformers

    from sdlora.models.component_configs import MODEL_CONFIGS

    spec, out = MODEL_CONFIGS[model], []
    for part in ("text_encoder", "text_encoder_2"):
        if part in spec:
            cfg = {k: v for k, v in spec[part].items() if k != "architectures"}
            cls = getattr(transformers, (spec[part].get("architectures") or ["CLIPTextModel"])[0])
            with torch.device("meta"):
                out.append(cls(transformers.CLIPTextConfig(**cfg)))
    return out


def main(argv=None) -> int:
    from diffusers import UNet2DConditionModel

    from sdlora.config.train_config import make_config
    from sdlora.families import family as family_named
    from sdlora.adapters.inject import resolve_text_encoder_targets, resolve_unet_targets
    from sdlora.adapters.spec import AdapterSpec
    from sdlora.training.memory import trace_step_bytes
    from sdlora.models.component_configs import MODEL_CONFIGS
    from sdlora.models import quiet_libraries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attn")
    p.add_argument("--json")
    args = p.parse_args(argv)
    quiet_libraries()
    gib, rows = 1024 ** 3, []
    print(f"LoRA rank {args.rank} on '{args.targets}', AdamW; GiB")
    print(f"{'model':<7} {'px':>5} {'prec':>5} {'ckpt':>5} {'batch':>5} {'te':>3} {'weights':>8} {'LoRA':>6} {'step':>6} {'total':>6} {'trace s':>8}")
    for model, res, prec, ckpt, batch, te in ROWS:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(MODEL_CONFIGS[model]["unet"])
        family = family_named(MODEL_CONFIGS[model]["family"])
        cfg = make_config(base_model="bench", data_dir="bench", rank=args.rank, alpha=args.rank, targets=[args.targets],
                          resolution=res, mixed_precision=prec, gradient_checkpointing=ckpt, batch_size=batch,
                          train_text_encoder=te)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        weights = sum(p.numel() for p in unet.parameters()) * dtype.itemsize
        spec = AdapterSpec(network="lora", rank=args.rank)
        lora = spec.parameter_count(resolve_unet_targets(unet, cfg.targets)) * 16
        trained = {}
        if te:
            trained = dict(zip(family.text_encoder_names, _text_encoders(model)))
            weights += sum(p.numel() for m in trained.values() for p in m.parameters()) * 4  # trained encoders stay fp32
            lora += sum(spec.parameter_count(resolve_text_encoder_targets(m)) for m in trained.values()) * 16
        t0 = time.perf_counter()
        step = trace_step_bytes(unet, family=family, config=cfg, compute_dtype=dtype, height=res, width=res,
                                trained_text_encoders=trained)
        took = time.perf_counter() - t0
        total = weights + lora + step
        rows.append(dict(model=model, resolution=res, precision=prec, gradient_checkpointing=ckpt, batch=batch, text_encoders=te,
                         weights_gib=weights / gib, lora_gib=lora / gib, step_gib=step / gib, total_gib=total / gib, trace_s=took))
        print(f"{model:<7} {res:>5} {prec:>5} {'yes' if ckpt else 'no':>5} {batch:>5} {'yes' if te else 'no':>3} {weights / gib:>8.2f} {lora / gib:>6.3f} "
              f"{step / gib:>6.2f} {total / gib:>6.2f} {took:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
