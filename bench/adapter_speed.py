"""Training-step time of each adapter type relative to plain LoRA, on an SD1.5-shaped UNet (random weights).

Each type is injected into a fresh copy of the same UNet (every transformer layer; LoCon/LoHa/LoKr/DoRA also the ResNet
blocks at the conv rank, as kohya's LoCon set), then timed over UNet forward + backward + AdamW steps on fixed inputs.

    python bench/adapter_speed.py                          # CPU, 256 px (32x32 latents), rank 16 / conv 8
    python bench/adapter_speed.py --device cuda --resolution 512 --precision bf16 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sdlora  # noqa: E402,F401  (first: it quiets libraries that log on import)

TYPES = {
    "lora": dict(network="lora"),
    "locon": dict(network="locon", conv=True),
    "loha": dict(network="loha", conv=True),
    "lokr": dict(network="lokr", conv=True, lokr_factor=8),
    "dora": dict(network="lora", conv=True, dora=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--conv-rank", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="as --gradient-checkpointing in training: LoHa/LoKr/DoRA's full-size weights are then recomputed "
                         "in the backward pass instead of kept (without it, DoRA on SD1.5 in fp32 needs over 24 GB)")
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    from sdlora.adapters.layers import make_trainable_fp32, trainable_parameters
    from sdlora.adapters.spec import AdapterSpec
    from sdlora.adapters.inject import inject_unet
    from sdlora.models.component_configs import MODEL_CONFIGS

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    config = {k: v for k, v in MODEL_CONFIGS["sd15"]["unet"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    state = UNet2DConditionModel(**config).state_dict()
    size = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, size, size, generator=g).to(device, dtype)
    hidden = torch.randn(1, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    target = torch.randn(1, 4, size, size, generator=g).to(device, torch.float32)

    print(f"SD1.5-shaped UNet, {args.resolution} px, batch 1, {args.precision} on {device}; rank {args.rank}, "
          f"conv rank {args.conv_rank}{', gradient checkpointing' if args.gradient_checkpointing else ''}; median of {args.steps} steps after one warm-up")
    results = {}
    for name in args.types.split(","):
        opts = dict(TYPES[name])
        conv = opts.pop("conv", False)
        spec = AdapterSpec(rank=args.rank, alpha=args.rank, conv_rank=args.conv_rank if conv else 0,
                           conv_alpha=args.conv_rank, **opts)
        unet = UNet2DConditionModel(**config)
        unet.load_state_dict(state)
        unet.requires_grad_(False)
        modules = inject_unet(unet, ["transformer"], spec)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        if (device.type, dtype) != ("cpu", torch.float32):  # a no-op .to() still makes diffusers warn
            unet.to(device, dtype)
        make_trainable_fp32(unet)
        params = [p for _, p in trainable_parameters(unet)]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for step in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = unet(latents, t, encoder_hidden_states=hidden).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
        n = sum(p.numel() for p in params)
        print(f"  {spec.label:14s} {len(modules):4d} modules {n / 1e6:7.2f} M params  {results[name]:7.3f} s/step  "
              f"x{results[name] / results.get('lora', results[name]):.2f} of LoRA", flush=True)
        del unet, opt, params


if __name__ == "__main__":
    main()
