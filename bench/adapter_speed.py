"""Training-step time and memory of each adapter type against LoRA/LoCon on the same modules, on an SD1.5- or
SDXL-shaped UNet (random weights), for sdlora's fast adapter forwards and for LyCORIS's reference modules.

Each type is injected into a fresh copy of the same UNet (every transformer layer; LoCon/LoHa/LoKr/DoRA-on-LoCon also
the ResNet blocks at the conv rank, as kohya's LoCon set), then timed over UNet forward + backward + AdamW steps on
fixed inputs. A type's ratios are against LoRA (attention only) or LoCon (with the ResNet set), measured in the same
run. "reference" builds LyCORIS's own modules (SDLORA_REFERENCE_ADAPTERS=1), which rebuild every adapted layer's
full weight; "fast" is what training uses. LoRA/LoCon themselves are PEFT's either way.

Memory is one more fwd+bwd step after the timed ones: on CUDA the allocator's peak above what was allocated before
the step (weights, adapter, AdamW state) and the peak in total; on the CPU the same "step" bytes counted tensor by
tensor (sdlora.training.memory.LiveTensorBytes, as the memory estimate's tests count a real step). --estimate also
prints the memory estimate's traced step (sdlora.training.memory.trace_step_bytes) for the same settings.

    OMP_NUM_THREADS=1 python bench/adapter_speed.py --resolution 128 --steps 2 \
        --reference-types loha,lokr,lokr-full,dora-lora --estimate                    # CPU, fp32 (bench/RESULTS.md)
    python bench/adapter_speed.py --device cuda --resolution 512 --precision bf16 --steps 5 --estimate
    python bench/adapter_speed.py --model sdxl --device cuda --resolution 1024 --precision bf16 --paths fast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
    "lokr-full": dict(network="lokr", conv=True, lokr_factor=8, lokr_full_matrix=True),
    "dora-lora": dict(network="lora", dora=True),
    "dora": dict(network="lora", conv=True, dora=True),
}
BASELINES = ("lora", "locon")  # PEFT's LoRA: the same module on either path
MIB = 1024 ** 2


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per type, after one warm-up step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--conv-rank", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    ap.add_argument("--paths", default="fast,reference", help="fast, reference or both (comma-separated)")
    ap.add_argument("--reference-types", help="types to run on the reference path (default: all of --types); the "
                    "reference DoRA on the LoCon set needs over 24 GB in fp32 at 256 px")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--estimate", nargs="?", const="all", default="",
                    help="also the memory estimate's traced step: for every row, or for these types (comma-separated)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    args.reference_types = args.reference_types or args.types
    unknown = (set(args.types.split(",")) | set(args.reference_types.split(","))) - set(TYPES) \
        or set(args.paths.split(",")) - {"fast", "reference"}
    if unknown:
        ap.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def _path(name: str):
    from sdlora.adapters.fast_common import REFERENCE_ENV

    old = os.environ.get(REFERENCE_ENV)
    os.environ[REFERENCE_ENV] = "1" if name == "reference" else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(REFERENCE_ENV, None)
        else:
            os.environ[REFERENCE_ENV] = old


class Bench:
    def __init__(self, args):
        from diffusers import UNet2DConditionModel

        from sdlora.families import family as family_named
        from sdlora.models.component_configs import MODEL_CONFIGS

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.config = {k: v for k, v in MODEL_CONFIGS[args.model]["unet"].items() if not k.startswith("_")}
        self.family = family_named(MODEL_CONFIGS[args.model]["family"])
        torch.manual_seed(0)
        with torch.device(self.device):  # random init on the device: an SDXL UNet in seconds on a GPU
            self.state = UNet2DConditionModel(**self.config).to(self.dtype).state_dict()
        size = args.resolution // 8
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(1, 4, size, size, generator=g).to(self.device, self.dtype)
        self.t = torch.tensor([500], device=self.device)
        self.target = torch.randn(1, 4, size, size, generator=g).to(self.device, torch.float32)
        cond = self.family.fake_conditioning(argparse.Namespace(**self.config), 1, 77, self.dtype, (args.resolution, args.resolution))
        hidden = torch.randn(cond.hidden.shape, generator=g).to(self.device, self.dtype)
        self.cond = type(cond)(hidden=hidden, pooled=None if cond.pooled is None else cond.pooled.to(self.device),
                               time_ids=None if cond.time_ids is None else cond.time_ids.to(self.device))

    def spec(self, name: str):
        from sdlora.adapters.spec import AdapterSpec

        opts = dict(TYPES[name])
        conv = opts.pop("conv", False)
        return AdapterSpec(rank=self.args.rank, alpha=self.args.rank, conv_rank=self.args.conv_rank if conv else 0,
                           conv_alpha=self.args.conv_rank, **opts)

    def build(self, name: str, path: str):
        from diffusers import UNet2DConditionModel

        from sdlora.adapters.inject import inject_unet
        from sdlora.adapters.layers import make_trainable_fp32, trainable_parameters

        with torch.device("meta"):
            unet = UNet2DConditionModel(**self.config)
        unet.load_state_dict(self.state, assign=True)
        unet.requires_grad_(False)
        spec = self.spec(name)
        with _path(path):
            modules = inject_unet(unet, ["transformer"], spec)
        if self.args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet.to(self.device)  # LyCORIS builds its tensors on the CPU
        make_trainable_fp32(unet)
        params = [p for _, p in trainable_parameters(unet)]
        return unet, spec, modules, params

    def step(self, unet) -> torch.Tensor:
        kind = self.device.type
        with torch.autocast(kind, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.family.unet_forward(unet, self.latents, self.t, self.cond)
        loss = torch.nn.functional.mse_loss(out.float(), self.target)
        loss.backward()
        return loss.detach()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, name: str, path: str) -> dict:
        from sdlora.training.memory import LiveTensorBytes

        unet, spec, modules, params = self.build(name, path)
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for i in range(self.args.steps + 1):
            self._sync()
            start = time.perf_counter()
            self.step(unet)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._sync()
            if i:
                times.append(time.perf_counter() - start)
        existing = [*unet.parameters(), *unet.buffers(), self.latents, self.t, self.target, self.cond.hidden,
                    *[v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]]
        existing += [x for x in (self.cond.pooled, self.cond.time_ids) if x is not None]
        held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in existing}.values())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step(unet)
            self._sync()
            peak_total = torch.cuda.max_memory_allocated()
            step_bytes = peak_total - before
        else:
            counter = LiveTensorBytes(*existing)
            with counter:
                self.step(unet)
            step_bytes, peak_total = counter.peak, counter.peak + held
        opt.zero_grad(set_to_none=True)
        label = spec.label + (" (full)" if spec.lokr_full_matrix else "")
        row = dict(type=name, label=label, path=path if name not in BASELINES else "peft", baseline=_baseline(name),
                   modules=len(modules),
                   params_m=sum(p.numel() for p in params) / 1e6, s_per_step=statistics.median(times),
                   step_mib=step_bytes / MIB, peak_mib=peak_total / MIB)
        if self.args.estimate == "all" or name in self.args.estimate.split(","):
            row["estimate_mib"] = self.estimate(name, path) / MIB
        del unet, opt, params
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    def estimate(self, name: str, path: str) -> int:
        """The memory estimate's traced step for the same settings and modules."""
        from diffusers import UNet2DConditionModel

        from sdlora.config.train_config import make_config
        from sdlora.training.memory import trace_step_bytes

        spec = self.spec(name)
        fields = {k: getattr(spec, k) for k in ("network", "rank", "alpha", "conv_rank", "conv_alpha", "dora",
                                                "lokr_factor", "lokr_full_matrix")}
        cfg = make_config(base_model="bench", data_dir="bench", targets=["transformer"], resolution=self.args.resolution,
                          batch_size=1, gradient_checkpointing=self.args.gradient_checkpointing,
                          mixed_precision={"fp32": "no"}.get(self.args.precision, self.args.precision), **fields)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**self.config)
        with _path(path):
            return trace_step_bytes(unet, family=self.family, config=cfg, compute_dtype=self.dtype,
                                    height=self.args.resolution, width=self.args.resolution)


def _baseline(name: str) -> str:
    return "locon" if TYPES[name].get("conv") else "lora"


def _print_row(row: dict, rows: list) -> None:
    base = next((r for r in rows if r["type"] == _baseline(row["type"])), None)
    ratio = (f"x{row['s_per_step'] / base['s_per_step']:5.2f}  x{row['step_mib'] / base['step_mib']:5.2f}  "
             f"x{row['peak_mib'] / base['peak_mib']:5.2f}") if base else "   -        -        -"
    est = f"  est {row['estimate_mib']:9.1f}" if "estimate_mib" in row else ""
    print(f"  {row['label']:15s} {row['path']:9s} {row['modules']:4d} {row['params_m']:7.2f} {row['s_per_step']:8.3f} "
          f"{row['step_mib']:9.1f} {row['peak_mib']:9.1f}  {ratio}  vs {base['label'] if base else '-'}{est}",
          flush=True)


def main(argv=None) -> int:
    args = _parse(argv)
    bench = Bench(args)
    names = args.types.split(",")
    print(f"{args.model}-shaped UNet, {args.resolution} px, batch 1, {args.precision} on {bench.device}; rank {args.rank}, "
          f"conv rank {args.conv_rank}{', gradient checkpointing' if args.gradient_checkpointing else ''}; median of "
          f"{args.steps} steps after one warm-up; memory in MiB (step: above weights + adapter + AdamW state)")
    print(f"  {'type':15s} {'path':9s} {'mods':>4s} {'M par':>7s} {'s/step':>8s} {'step MiB':>9s} {'peak MiB':>9s}  "
          f"time     step     peak   (ratios)")
    rows: list[dict] = []
    needed = {n for n in names if n in BASELINES} | {_baseline(n) for n in names}
    for name in [n for n in BASELINES if n in needed]:
        rows.append(bench.measure(name, "fast"))
        _print_row(rows[-1], rows)
        _save(args, rows)
    for path in args.paths.split(","):
        chosen = args.reference_types.split(",") if path == "reference" else names
        for name in [n for n in names if n not in BASELINES and n in chosen]:
            rows.append(bench.measure(name, path))
            _print_row(rows[-1], rows)
            _save(args, rows)
    return 0


def _save(args, rows: list) -> None:
    """After every row, so a run cut short by a time limit keeps what it measured."""
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    sys.exit(main())
