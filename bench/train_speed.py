"""Training-step speed and memory on an SD1.5- or SDXL-shaped model (random weights: compute is what matters).

Three loops over the same LoRA-injected UNet, timed interleaved in one process after warm-up:
  floor   a bare loop: UNet forward + backward + AdamW step on precomputed latents and text embeddings
  sdlora  sdlora's Trainer.train_step (cached latents / text embeddings, its data path and bookkeeping)
  naive   what the diffusers example trainer does: decode the image, VAE-encode and text-encode every step

Peak memory per loop is measured in a separate process each (`--memory`), since RSS peaks are per process.

    python bench/train_speed.py                      # CPU, 256 px, SD1.5-shaped
    python bench/train_speed.py --model sdxl --resolution 128 --steps 2   # SDXL-shaped (2.6B UNet, both encoders)
    python bench/train_speed.py --device cuda --resolution 512 --precision bf16
    python bench/train_speed.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sdlora  # noqa: E402,F401  (first: it quiets libraries that log on import)


BENCH_MODELS = {"sd15": "SD1.5-shaped", "sdxl": "SDXL-shaped", "tiny": "builtin:tiny", "tiny-xl": "builtin:tiny-xl"}


def build_random(model: str, device: str, dtype: torch.dtype):
    """Full-size pipeline components of `model` ('sd15', 'sdxl') with random weights, wrapped as sdlora's BaseModel."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from sdlora.families import family as family_named
    from sdlora.models.component_configs import MODEL_CONFIGS, write_config_folder
    from sdlora.models import BaseModel
    from sdlora.paths import cache_dir

    cfg = MODEL_CONFIGS[model]
    family = family_named(cfg["family"])
    folder = write_config_folder(model, cache_dir() / "configs" / model)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    vae = AutoencoderKL.from_config(cfg["vae"])
    encoders = []
    for part in family.text_encoder_names:
        cls = getattr(transformers, (cfg[part].get("architectures") or ["CLIPTextModel"])[0])
        encoders.append(cls(CLIPTextConfig(**{k: v for k, v in cfg[part].items() if k != "architectures"})))
    tokenizers = [CLIPTokenizer.from_pretrained(folder / part) for part in family.tokenizer_names]
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    unet.to(device, dtype)
    for te in encoders:
        te.to(device, dtype)
    vae.to(device, torch.float32)
    return BaseModel(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=sched,
                     prediction_type="epsilon", source=f"bench:{model}-random", kind="builtin",
                     default_resolution=cfg["resolution"], model_hash=f"bench-{model}-random", name=f"{model}-random")


def make_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.effect_noise((size, size), 40 + i).convert("RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of a thing, number {i}")
    return folder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, args):
        from sdlora.config.train_config import make_config
        from sdlora.training.trainer import Trainer

        self.args = args
        self.device = args.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        t0 = time.perf_counter()
        if args.model.startswith("tiny"):  # the same loops on a built-in model: keeps this script tested (test_bench.py)
            from sdlora.models import load_base_model

            self.base = load_base_model(f"builtin:{args.model}")
            self.base.unet.to(self.device, self.dtype)
            for te in self.base.text_encoders:
                te.to(self.device, self.dtype)
        else:
            self.base = build_random(args.model, self.device, self.dtype)
        self.family = self.base.family
        self.build_s = time.perf_counter() - t0
        self.tmp = Path(tempfile.mkdtemp(prefix="sdlora-bench-"))
        data = make_images(self.tmp / "data", 4, args.resolution)
        config = make_config(base_model="builtin:tiny", data_dir=str(data), output_dir=str(self.tmp / "out"), rank=args.rank,
                             alpha=args.rank, targets=["attn"], resolution=args.resolution, batch_size=1, steps=10_000,
                             lr=1e-4, mixed_precision="no" if args.precision == "fp32" else args.precision,
                             gradient_checkpointing=args.gradient_checkpointing, cache_latents=True, optimizer=args.optimizer,
                             compile=args.compile)
        t0 = time.perf_counter()
        # Alone (its memory process), sdlora owns its model as `python -m sdlora train` does and frees what it no
        # longer needs; interleaved with the naive loop, the model is shared.
        self.trainer = Trainer(config, base=self.base, owns_base=args.loops == ["sdlora"])
        self.trainer.prepare()
        self.prepare_s = time.perf_counter() - t0
        self.trainer.unet.train()
        self.trainer.position_at(0)
        self.step_no = 0
        self.data_waits: list[float] = []  # seconds each sdlora step waited for its batch
        # Precomputed inputs for the floor loop, and the raw files for the naive loop.
        ds = self.trainer.dataset
        self.latents = self.trainer.latents.get(0, False).unsqueeze(0).to(self.device)
        # From sdlora's text cache: on CUDA its frozen text encoders have left the GPU by now.
        self.geometry = [ds.geometry_for(0, 0, flip=False)]
        self.cond = self.family.conditioning(self.trainer.text_cache.get([ds.fixed_caption(0)]), self.geometry).to(self.device)
        self.items = self.trainer.report.items
        params = [p for p in self.base.unet.parameters() if p.requires_grad]
        self.floor_opt = torch.optim.AdamW(params, lr=1e-4)
        self.naive_opt = torch.optim.AdamW(params, lr=1e-4)
        self.sched = self.base.noise_scheduler
        if "naive" in args.loops:
            # The naive loop encodes every step, so its VAE and text encoder live on the device (sdlora moves them off).
            self.base.vae.to(self.device)
            for te in self.base.text_encoders:
                te.to(self.device)

    def _unet_step(self, latents, cond, opt):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = self.sched.add_noise(latents, noise, t)
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.family.unet_forward(self.base.unet, noisy.to(self.dtype), t, cond.to(self.device, self.dtype))
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def floor(self):
        return self._unet_step(self.latents, self.cond, self.floor_opt)

    def sdlora(self):
        self.step_no += 1
        loss = self.trainer.train_step(self.step_no)
        self.data_waits.append(self.trainer.data_seconds)
        return loss

    def naive(self):
        from sdlora.data.images import load_training_image

        item = self.items[self.step_no % len(self.items)]
        pixels = load_training_image(item.path, (self.args.resolution, self.args.resolution)).unsqueeze(0).to(self.device)
        with torch.no_grad():
            latents = self.base.vae.encode(pixels).latent_dist.sample() * self.base.vae.config.scaling_factor
            text = self.family.encode(self.base.text_encoders, self.base.tokenizers, [item.caption], self.device)
        return self._unet_step(latents, self.family.conditioning(text, self.geometry), self.naive_opt)

    def timed(self, name):
        sync(self.device)
        t0 = time.perf_counter()
        getattr(self, name)()
        sync(self.device)
        return time.perf_counter() - t0


def unet_flops(bench: Bench) -> float:
    """FLOPs of one UNet forward+backward at this size, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bench.floor()
    return float(counter.get_total_flops())


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_timing(args) -> dict:
    t_start = time.perf_counter()
    bench = Bench(args)
    names = ["floor", "sdlora", "naive"]
    first = {}
    for name in names:  # warm-up; also the time to the first step
        first[name] = bench.timed(name)
    first_step_sdlora = time.perf_counter() - t_start
    times = {n: [] for n in names}
    for r in range(args.steps):
        order = names[r % 3:] + names[: r % 3]  # rotate so no loop always runs right after another
        for name in order:
            times[name].append(bench.timed(name))
    # Median: on a shared 2-core machine single steps jump by 20%; the median is the steady-state step.
    mean = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "model": args.model, "device": args.device, "precision": args.precision, "resolution": args.resolution, "rank": args.rank, "batch": 1,
        "steps_measured": args.steps, "seconds_per_step": mean, "seconds_per_step_mean": {n: sum(v) / len(v) for n, v in times.items()}, "steps_per_second": {n: 1 / m for n, m in mean.items()},
        "sdlora_over_floor": mean["sdlora"] / mean["floor"], "naive_over_sdlora": mean["naive"] / mean["sdlora"],
        # The fastest step of each loop: least disturbed by other work on a shared machine.
        "seconds_per_step_min": {n: min(v) for n, v in times.items()},
        "sdlora_over_floor_min": min(times["sdlora"]) / min(times["floor"]),
        "sdlora_data_wait_s_median": statistics.median(bench.data_waits[1:]),
        "build_model_s": bench.build_s, "sdlora_prepare_s": bench.prepare_s, "time_to_first_sdlora_step_s": first_step_sdlora,
        "all_step_times": times,
    }
    if args.mfu:
        flops = unet_flops(bench)
        rate = matmul_rate(args.device, bench.dtype)
        result["unet_fwd_bwd_tflop"] = flops / 1e12
        result["matmul_tflops"] = rate / 1e12
        result["mfu_sdlora"] = flops / mean["sdlora"] / rate
    if args.device == "cuda":
        result["peak_cuda_mib_all_loops"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


class RssSampler:
    """Highest resident set size seen while running: the steps' own peak, not the model build's."""

    def __init__(self, interval: float = 0.005):
        import threading

        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_memory_only(args, loop: str) -> dict:
    """One loop alone for a few steps (after one warm-up) in its own process: peak RSS during the steps, peak CUDA,
    and for sdlora its memory estimate next to what the step really allocated."""
    import gc

    from sdlora.training.memory import LiveTensorBytes

    args.loops = [loop]
    bench = Bench(args)
    getattr(bench, loop)()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as rss:
        for _ in range(3):
            getattr(bench, loop)()
    out = {"loop": loop, "peak_rss_mib": rss.peak / 2 ** 20, "process_peak_rss_mib": peak_rss_mib()}
    if args.device == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if loop == "sdlora" and bench.trainer.memory_estimate is not None:
        est = bench.trainer.memory_estimate
        out["estimate_total_mib"] = est.total / 2 ** 20
        out["estimate_step_mib"] = est.activations / 2 ** 20
        # The same step again, with every tensor it creates counted (slow: a Python call per op).
        unet = bench.trainer.accelerator.unwrap_model(bench.trainer.unet)
        opt_state = [t for st in bench.trainer.optimizer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        counter = LiveTensorBytes(*unet.parameters(), *unet.buffers(), *opt_state)
        with counter:
            bench.sdlora()
        out["measured_step_mib"] = counter.peak / 2 ** 20
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 512 on CUDA")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--model", choices=list(BENCH_MODELS), default="sd15",
                   help="sd15 / sdxl: full-size random weights; tiny / tiny-xl: the built-in models, to check the script quickly")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="measured steps per loop (after one warm-up step each)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "prodigy"], default="adamw", help="sdlora's optimizer")
    p.add_argument("--compile", action="store_true", help="torch.compile sdlora's UNet (the floor and naive loops share it)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-loop memory subprocesses")
    p.add_argument("--no-mfu", dest="mfu", action="store_false")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--memory-only", choices=["floor", "sdlora", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.loops = ["floor", "sdlora", "naive"]
    native = {"sdxl": 1024}.get(args.model, 512)
    args.resolution = args.resolution or (64 if args.model.startswith("tiny") else native if args.device == "cuda" else 256)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    os.environ.setdefault("SDLORA_CACHE", str(Path(tempfile.gettempdir()) / "sdlora-bench-cache"))
    from sdlora.models import quiet_libraries

    quiet_libraries()
    if args.memory_only:
        print(json.dumps(run_memory_only(args, args.memory_only)))
        return 0
    result = run_timing(args)
    import gc

    gc.collect()  # the timing run's model must be gone before each memory process loads its own (SDXL: ~15 GB each)
    if args.memory:
        result["peak_memory"] = {}
        for loop in ("floor", "sdlora", "naive"):
            cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--resolution", str(args.resolution), "--precision",
                   args.precision, "--rank", str(args.rank), "--memory-only", loop]
            cmd += ["--optimizer", args.optimizer] + (["--compile"] if args.compile else [])
            if args.gradient_checkpointing:
                cmd.append("--gradient-checkpointing")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result["peak_memory"][loop] = json.loads(out.stdout.strip().splitlines()[-1])
    print_table(result)
    print(json.dumps({k: v for k, v in result.items() if k != "all_step_times"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def print_table(r: dict) -> None:
    print(f"\n{BENCH_MODELS[r['model']]} UNet, {r['device']} {r['precision']}, {r['resolution']} px, batch 1, rank {r['rank']}, "
          f"{r['steps_measured']} interleaved steps after warm-up")
    print(f"{'loop':<8} {'s/step*':>9} {'steps/s':>9} {'peak RSS MiB':>13} {'peak CUDA MiB':>14}")
    for name in ("floor", "sdlora", "naive"):
        mem = r.get("peak_memory", {}).get(name, {})
        print(f"{name:<8} {r['seconds_per_step'][name]:>9.3f} {r['steps_per_second'][name]:>9.3f} "
              f"{mem.get('peak_rss_mib', float('nan')):>13.0f} {mem.get('peak_cuda_mib', float('nan')):>14.0f}")
    print("* median seconds per step")
    print(f"sdlora/floor = {r['sdlora_over_floor']:.3f} (fastest steps: {r['sdlora_over_floor_min']:.3f})   "
          f"naive/sdlora = {r['naive_over_sdlora']:.3f}   "
          f"time to first sdlora step = {r['time_to_first_sdlora_step_s']:.1f} s (model build {r['build_model_s']:.1f} s)")
    print(f"sdlora waited {1000 * r['sdlora_data_wait_s_median']:.2f} ms per step for its batch (median)")
    est = r.get("peak_memory", {}).get("sdlora", {})
    if "estimate_step_mib" in est:
        print(f"memory estimate: one step {est['estimate_step_mib']:.0f} MiB traced vs {est['measured_step_mib']:.0f} MiB "
              f"allocated by a real step; whole run {est['estimate_total_mib']:.0f} MiB estimated")
    if "mfu_sdlora" in r:
        print(f"UNet fwd+bwd = {r['unet_fwd_bwd_tflop']:.2f} TFLOP, matmul rate {r['matmul_tflops']:.2f} TFLOP/s, "
              f"sdlora MFU = {100 * r['mfu_sdlora']:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
