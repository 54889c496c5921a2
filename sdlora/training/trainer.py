"""The training loop (accelerate). Reports progress as events; the CLI and the UI only listen.

Reading order: `train()` prepares everything, `_run_loop()` is the loop, small helpers do one thing each.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .checkpoints import save_checkpoint
from ..config.train_config import ConfigError, TrainConfig
from ..errors import UserError
from .events import TrainEvent
from ..formats.export import build_metadata, export_diffusers, export_kohya
from ..families import Conditioning
from ..adapters.layers import is_up_parameter, make_trainable_fp32, trainable_parameters
from ..adapters.spec import AdapterSpec
from ..adapters.inject import inject_text_encoder, inject_unet
from ..inference.sampling import generate, parse_prompt_line, sample_filename, save_png_atomic
from ..data.training_set import LatentCache, TextEmbeddingCache

MAX_CONSECUTIVE_NONFINITE = 3
# Validation loss: each validation image is noised at this many fixed timesteps, spread over the schedule.
VALIDATION_TIMESTEPS = 4
# Test hook: slows every step so kill -9 tests can land mid-run on a fast machine.
_STEP_DELAY = float(os.environ.get("SDLORA_STEP_DELAY", "0") or 0)


class TrainingError(UserError, RuntimeError):
    """A failure with a message meant for the user."""


@dataclass
class TrainResult:
    lora_path: Path | None
    output_dir: Path
    steps: int
    final_loss: float | None
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stopped_early: bool = False


def _make_optimizer(config: TrainConfig, groups: list[dict]):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optimizer 'adamw8bit' needs bitsandbytes: pip install -r requirements.txt, or use --optimizer adamw.") from None
        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"optimizer: unknown optimizer '{config.optimizer}' (use adamw, adamw8bit or prodigy).")


def _param_groups(module, lr: float, loraplus_ratio: float | None) -> list[dict]:
    """The module's adapter parameters as optimizer groups. LoRA+ (kohya's loraplus_lr_ratio): the up/B matrices get their
    own group at lr x ratio."""
    named = trainable_parameters(module)
    if not loraplus_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    up = [p for n, p in named if is_up_parameter(n)]
    down = [p for n, p in named if not is_up_parameter(n)]
    return [{"params": down, "lr": lr}, {"params": up, "lr": lr * loraplus_ratio}]


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma) / snr
    if prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A B x 1 x H x W pixel mask downscaled to the latent `size` (h, w) by area averaging."""
    mask = mask.float()
    return mask if tuple(mask.shape[-2:]) == tuple(size) else F.interpolate(mask, size=tuple(size), mode="area")


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of a B x C x h x w per-pixel loss weighted by `mask` (B x 1 x H x W, area-averaged to h x w),
    divided by the mask's mean: the mean loss over the learned pixels (0 for a sample with an all-black mask)."""
    m = latent_mask(mask, loss.shape[-2:]).to(loss.device, loss.dtype)
    return (loss * m).mean(dim=(1, 2, 3)) / m.mean(dim=(1, 2, 3)).clamp_min(1e-6)


class Trainer:
    """Holds the prepared run; `run()` executes it. Built by `train()`."""

    def __init__(self, config: TrainConfig, on_event: Callable[[TrainEvent], None] | None = None,
                 stop_event: threading.Event | None = None, base=None, owns_base: bool | None = None):
        self.config = config
        self._given_base = base
        # A model loaded for this run may lose the parts the run no longer needs; one handed in by the caller may not.
        self.owns_base = base is None if owns_base is None else owns_base
        self.on_event = on_event or (lambda e: None)
        self.stop_event = stop_event or threading.Event()
        self.out_dir = config.output_path()
        self.samples: list[Path] = []
        self.checkpoints: list[Path] = []

    # events ------------------------------------------------------------------
    def emit(self, kind: str, step: int = 0, **data: Any) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            self.on_event(TrainEvent(kind=kind, step=step, total_steps=getattr(self, "total_steps", 0), data=data))

    accelerator = None
    started_at: float | None = None

    # set-up ------------------------------------------------------------------
    def prepare(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        from ..models import MODEL_LOCK, load_base_model, resolve_model_spec

        cfg = self.config
        # Cheap checks first: a bad folder or model path fails before any model is loaded.
        from ..data.plan import build_training_data

        self.data = build_training_data(cfg)  # every folder and the dataset TOML are checked here, before any model
        self.report = self.data.reports[0][1]
        self.data_dir = self.report.root
        self.dataset = self.data.dataset
        self._shuffles = any(s.shuffle_tags for s in self.dataset.subsets)
        if self._given_base is None:
            resolve_model_spec(cfg.base_model)
        self.sample_prompts = [parse_prompt_line(p) for p in cfg.all_sample_prompts()]
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; on CPU use 'bf16' or 'no'.")

        # accelerate keeps one process-wide state that refuses a second precision; the web UI trains many runs in one
        # process, so each run starts a fresh one (the process group, if launched distributed, is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        trackers = {}
        if cfg.log_with == "tensorboard":
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise ConfigError("log_with: tensorboard needs the tensorboardX (or tensorboard) package: "
                                  "pip install tensorboardX, or set log_with to none.")
            trackers = {"log_with": "tensorboard", "project_dir": str(self.out_dir / "logs")}  # events: logs/tensorboard
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1, **trackers)
        acc = self.accelerator
        self.emit("status", message=self.data.summary())
        set_seed(cfg.seed)
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)

        t0 = time.perf_counter()
        self.emit("status", message=f"Loading base model {cfg.base_model} ...")
        pred = None if cfg.prediction_type == "auto" else cfg.prediction_type
        self.base = self._given_base or load_base_model(cfg.base_model, allow_pickle=cfg.allow_pickle, prediction_type=pred)
        base = self.base
        self.family = base.family
        self.te_names = list(self.family.text_encoder_names)
        for module in (base.unet, base.vae, *base.text_encoders):
            module.requires_grad_(False)
        te_lrs = cfg.text_encoder_lrs(len(self.te_names))

        # Seed right before injection: LoRA init must not depend on what loading the model consumed.
        set_seed(cfg.seed)
        self.adapter = AdapterSpec.from_config(cfg)
        with MODEL_LOCK:  # new LoRA layers are modules too: not while another thread is loading a model
            self.unet_modules = inject_unet(base.unet, cfg.targets, self.adapter)
            # A text encoder whose LR is 0 stays frozen (kohya's way of training one SDXL encoder only).
            self.trained_te = [i for i in range(len(self.te_names)) if cfg.train_text_encoder and te_lrs[i] > 0]
            self.te_modules = {self.te_names[i]: inject_text_encoder(base.text_encoders[i], self.adapter)
                               for i in self.trained_te}
        n_te_modules = sum(len(m) for m in self.te_modules.values())
        n_params = self.adapter.parameter_count(self.unet_modules) + sum(
            self.adapter.parameter_count(m) for m in self.te_modules.values())
        self.emit("status", message=f"{self.family.label} model; {self.adapter.label} on {len(self.unet_modules)} UNet and {n_te_modules} "
                                    f"text-encoder modules: {n_params:,} trainable parameters")
        # Once latents and captions are cached, the VAE encoder and a frozen text encoder are idle. An owned model drops
        # them (previews use cached prompt embeddings and the VAE decoder); on CUDA what is kept leaves the GPU until
        # previews bring it back.
        on_cuda = self.device.type == "cuda"
        self.vae_leaves_device = cfg.cache_latents and (on_cuda or self.owns_base)
        self.te_leaves_device = not self.trained_te and not self._shuffles and (on_cuda or self.owns_base)
        self._check_memory(n_params)

        # Frozen weights in the compute dtype, LoRA weights in fp32; the VAE stays fp32 (fp16 VAEs overflow to NaN).
        base.unet.to(self.device, dtype=self.weight_dtype)
        for i, te in enumerate(base.text_encoders):
            te.to(self.device, dtype=torch.float32 if i in self.trained_te else self.weight_dtype)
            make_trainable_fp32(te)
        base.vae.to(self.device, dtype=torch.float32)
        make_trainable_fp32(base.unet)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for i in self.trained_te:
                base.text_encoders[i].activation_checkpointing_enable()
        if self.device.type == "cuda":
            base.unet.to(memory_format=torch.channels_last)
        if cfg.compile:
            base.unet.compile()  # in place: the module (and its LoRA parameters) stay the same objects

        self.dataset.on_unreadable = self._on_unreadable  # an image failing mid-run is skipped with a warning
        if cfg.cache_latents and any(s.random_crop for s in self.dataset.subsets):
            self.emit("warning", message="Random crop is off while latents are cached (each image is encoded once, centre-cropped). Set cache_latents = false for random crops.")
        from ..data.plan import make_step_plan

        self.plan = make_step_plan(cfg, self.dataset, acc.num_processes)
        self.total_steps, self.steps_per_epoch = self.plan.total_steps, self.plan.steps_per_epoch

        self._prepare_validation()
        self.latents = None
        if cfg.cache_latents:
            self.emit("status", message="Caching latents ...")
            self.latents = LatentCache(base.vae, vae_id=f"{base.model_hash}:vae", cache_dir=self.out_dir / "cache" / "latents" if acc.is_main_process else None,
                                       device=self.device)
            flips = (False, True) if self.dataset.any_flip else (False,)
            self.latents.build(self.dataset, flips=flips)
            if self.vae_leaves_device:
                if self.owns_base:
                    base.vae.encoder = base.vae.quant_conv = None  # only decoding is left to do
                base.vae.to("cpu")
        self.text_cache = TextEmbeddingCache(self.family, base.tokenizers, base.text_encoders, self.device)
        if not self.trained_te and not self._shuffles:
            # Every caption the run can see is known now (fixed, or "" under dropout), and so are the preview prompts:
            # encode them once.
            captions = {self.dataset.fixed_caption(i) for i in range(len(self.dataset.items))} | {""}
            captions |= set(self._val_captions)
            captions |= {p.prompt for p in self.sample_prompts} | {p.negative for p in self.sample_prompts}
            captions = sorted(captions)
            for start in range(0, len(captions), 16):
                self.text_cache.get(captions[start: start + 16])
            if self.te_leaves_device:
                if self.owns_base:
                    base.text_encoders = self.text_cache.text_encoders = [None] * len(base.text_encoders)
                else:
                    for te in base.text_encoders:
                        te.to("cpu")
        self._encoder = LatentCache(base.vae, vae_id="", cache_dir=None, device=self.device)
        self._loader = ThreadPoolExecutor(max_workers=max(1, cfg.num_workers), thread_name_prefix="sdlora-data")
        self._epoch_batches, self._prefetched = {}, {}

        groups = _param_groups(base.unet, cfg.lr, cfg.loraplus_lr_ratio)
        for i in self.trained_te:
            groups += _param_groups(base.text_encoders[i], te_lrs[i], cfg.loraplus_lr_ratio)
        self.trainable = [p for g in groups for p in g["params"]]
        optimizer = _make_optimizer(cfg, groups)
        from diffusers.optimization import get_scheduler

        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=self.total_steps)
        trained = [base.unet] + [base.text_encoders[i] for i in self.trained_te]
        *prepared, self.optimizer, self.scheduler = acc.prepare(*trained, optimizer, scheduler)
        self.unet = prepared[0]
        # What the loop calls: the prepared (DDP-wrapped) modules for trained encoders, the plain ones otherwise.
        self.text_encoders = list(base.text_encoders)
        for i, module in zip(self.trained_te, prepared[1:]):
            self.text_encoders[i] = module
        if self.trained_te:  # captions are encoded every step through the modules that train
            self.text_cache.text_encoders = self.text_encoders
        self.noise_scheduler = base.noise_scheduler
        self.prediction_type = base.prediction_type
        self.start_step = 0
        if cfg.resume:
            self._resume(cfg.resume)
        self.time_to_prepare = time.perf_counter() - t0

    def _prepare_validation(self) -> None:
        """Encode the validation images once (centre crop, no flip) while the VAE encoder is still here, and fix each
        sample's caption (no shuffle or dropout) and size conditioning."""
        val = self.validation = self.data.validation
        self._val_latents, self._val_captions, self._val_geometry = [], [], []
        if val is None:
            return
        self.emit("status", message=f"Encoding {len(val.entries)} validation image(s) ...")
        encoder = LatentCache(self.base.vae, vae_id="", cache_dir=None, device=self.device)
        encoder.build(val, flips=(False,))
        self._val_latents = [encoder.get(e.item_index, False) for e in val.entries]
        self._val_captions = [val.fixed_caption(e.item_index) for e in val.entries]
        self._val_geometry = [val.geometry_for(0, k, flip=False) for k in range(len(val.entries))]

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean MSE over the validation images, each at VALIDATION_TIMESTEPS timesteps spread over the schedule, with
        noise and timesteps seeded from (seed, "validation", index): the same numbers at every step, in every run and
        after a resume, so the values compare. Eval mode, no gradients, through the training's conditioning and
        family.unet_forward."""
        from ..families import TextEmbedding
        from ..data.training_set import _rng

        cfg, acc = self.config, self.accelerator
        unet = acc.unwrap_model(self.unet)
        encoders = [acc.unwrap_model(te) if te is not None else None for te in self.text_encoders]
        trained = [unet] + [encoders[i] for i in self.trained_te]
        modes = [m.training for m in trained]
        for m in trained:
            m.eval()
        n_t, horizon = VALIDATION_TIMESTEPS, self.noise_scheduler.config.num_train_timesteps
        total = 0.0
        try:
            for k, latent in enumerate(self._val_latents):
                gen = torch.Generator().manual_seed(_rng(cfg.seed, "validation", k).getrandbits(63))
                latents = latent.float().unsqueeze(0).repeat(n_t, 1, 1, 1)
                noise = torch.randn(latents.shape, generator=gen)
                offset = torch.rand((), generator=gen).item()
                timesteps = ((torch.arange(n_t) + offset) * horizon / n_t).long().clamp(0, horizon - 1)
                latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
                noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
                caption = [self._val_captions[k]]
                if self.trained_te:
                    text = self.family.encode(encoders, self.base.tokenizers, caption, self.device)
                else:
                    text = self.text_cache.get(caption)
                text = TextEmbedding.stack(text.rows() * n_t)
                cond = self.family.conditioning(text, [self._val_geometry[k]] * n_t)
                if self.device.type == "cuda":
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                with acc.autocast():
                    pred = self.family.unet_forward(unet, noisy.to(self.weight_dtype), timesteps,
                                                    cond.to(self.device, self.weight_dtype))
                total += F.mse_loss(pred.float(), target.float()).item()
        finally:
            for m, mode in zip(trained, modes):
                m.train(mode)
        return total / len(self._val_latents)

    def _validate(self, step: int) -> float | None:
        """Validation loss at `step`: logged to train_log.jsonl and emitted as a "validation" event (main process)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.validation is None or not acc.is_main_process:
            return None
        try:
            value = self.validation_loss()
        except Exception as exc:  # noqa: BLE001 - like previews, a failed validation must not end the run
            from ..errorlog import what_went_wrong

            self.emit("warning", step=step, message=f"Validation at step {step} failed ({what_went_wrong(exc)}); training "
                      "continues.")
            return None
        self._write_log(self.out_dir / "train_log.jsonl", step, {"step": step, "val_loss": value})
        self._track({"val_loss": value}, step)
        self.emit("validation", step=step, val_loss=value)
        return value

    def _check_memory(self, n_params: int) -> None:
        from .memory import estimate_training_memory

        try:
            est = estimate_training_memory(family=self.family, unet=self.base.unet, text_encoders=self.base.text_encoders,
                                           vae=self.base.vae, lora_params=n_params, config=self.config, device=self.device,
                                           trained_text_encoders=self.trained_te, vae_on_device=not self.vae_leaves_device,
                                           text_encoders_on_device=not self.te_leaves_device)
        except Exception as exc:  # an estimate must never stop a run
            self.memory_estimate = None
            self.emit("status", message=f"No memory estimate for this model ({type(exc).__name__}: {exc}).")
            return
        self.memory_estimate = est
        if est.fits():
            self.emit("status", message=est.describe())
        else:
            self.emit("warning", message=est.describe() + ". This may not fit: lower batch_size or resolution, turn on "
                      "gradient_checkpointing, use bf16/fp16 mixed precision or the adamw8bit optimizer.")

    def _resume(self, resume: str) -> None:
        """Checked before use (see sdlora.training.resume): 'latest' falls back past damaged checkpoints, saying so."""
        from .resume import apply_checkpoint, choose_checkpoint

        modules = self.adapted_modules()
        ckpt = choose_checkpoint(resume, self.out_dir, modules=modules, optimizer=self.optimizer)
        for path, why in ckpt.skipped:
            self.emit("warning", message=f"Checkpoint {path} is damaged or does not fit this run ({why}); it was skipped.")
        if ckpt.step > self.total_steps:
            raise TrainingError(f"resume: checkpoint '{ckpt.path}' is at step {ckpt.step}, past this run's {self.total_steps} "
                                f"steps. Set steps above {ckpt.step}, or resume from an earlier checkpoint.")
        apply_checkpoint(ckpt, modules=modules, optimizer=self.optimizer, scheduler=self.scheduler)
        self.start_step = ckpt.step
        self.emit("status", message=f"Resumed from {ckpt.path} at step {self.start_step}")

    # one step ----------------------------------------------------------------
    def _pixels(self, epoch: int, indices: list[int]) -> torch.Tensor:
        ds = self.dataset
        pixels = torch.stack([ds.pixels_for(epoch, i, flip=ds.flip_for(epoch, i)) for i in indices])
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def _batch(self, epoch: int, indices: list[int], pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning]:
        ds = self.dataset
        flips = [ds.flip_for(epoch, i) for i in indices]
        if self.latents is not None:
            latents = torch.stack([self.latents.get(ds.entries[i].item_index, f) for i, f in zip(indices, flips)])
            latents = latents.to(self.device, non_blocking=True)
        else:
            if pixels is None:
                pixels = self._pixels(epoch, indices)
            latents = self._encoder.encode(pixels.to(self.device, non_blocking=True))
        captions = [ds.caption_for(epoch, i) for i in indices]
        if self.trained_te:
            text = self.text_cache.encode(captions)
        elif self._shuffles:
            with torch.no_grad():
                text = self.text_cache.encode(captions)  # too many variants to cache
        else:
            text = self.text_cache.get(captions)
        geometries = [ds.geometry_for(epoch, i, flip=f) for i, f in zip(indices, flips)]
        return latents, self.family.conditioning(text, geometries)

    def _loss(self, latents: torch.Tensor, cond: Conditioning, step: int, micro: int,
              weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the per-sample losses times `weights` (kohya's loss_weights: prior_loss_weight for reg samples).
        `mask` (B x 1 x H x W in [0, 1], any size; masked loss) weights the per-pixel MSE after area-averaging to the
        latent size; each sample's loss is divided by its mask's mean, so it stays the mean over the learned area."""
        cfg = self.config
        # Noise and timesteps depend only on (seed, step, micro-batch, process): resume reproduces them exactly.
        gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro, self.accelerator.process_index)) & 0x7FFFFFFF)
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if self.device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            pred = self.family.unet_forward(self.unet, noisy.to(self.weight_dtype), timesteps,
                                            cond.to(self.device, self.weight_dtype))
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if mask is not None:
            loss = masked_mean(loss, mask)
        else:
            loss = loss.mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma:
            loss = loss * _min_snr_weights(self.noise_scheduler, timesteps, cfg.min_snr_gamma, self.prediction_type).to(loss.device)
        if weights is not None:
            loss = loss * weights.to(loss.device, loss.dtype)
        return loss.mean()

    # the loop ----------------------------------------------------------------
    def _indices(self, step: int, micro: int) -> tuple[int, list[int]]:
        """Which samples micro-batch `micro` of optimizer step `step` uses: a pure function of the step, so a
        resumed run reads exactly what an uninterrupted one would."""
        cfg, acc = self.config, self.accelerator
        epoch = step // self.steps_per_epoch
        if epoch not in self._epoch_batches:
            self._epoch_batches = {epoch: self.dataset.batches_for_epoch(epoch, cfg.batch_size, process_index=acc.process_index,
                                                                          num_processes=acc.num_processes)}
        batches = self._epoch_batches[epoch]
        return epoch, batches[((step % self.steps_per_epoch) * cfg.grad_accum + micro) % len(batches)]

    def _next_batch(self, step: int, micro: int) -> tuple[torch.Tensor, Conditioning]:
        epoch, indices = self._indices(step, micro)
        self.epoch = epoch
        pixels = None
        if self.latents is None:
            # Uncached images are decoded in worker threads one micro-batch ahead, so the step never waits on Pillow.
            key = (step, micro)
            future = self._prefetched.pop(key, None)
            pixels = future.result() if future else self._pixels(epoch, indices)
            nxt = (step, micro + 1) if micro + 1 < self.config.grad_accum else (step + 1, 0)
            if nxt[0] < self.total_steps:
                n_epoch, n_indices = self._indices(*nxt)
                self._prefetched = {nxt: self._loader.submit(self._pixels, n_epoch, n_indices)}
        return self._batch(epoch, indices, pixels)

    def _loss_weights(self, step: int, micro: int) -> torch.Tensor | None:
        """Per-sample loss weights of a micro-batch; None when every sample weighs 1 (no reg images)."""
        if not self.dataset.num_reg_samples or self.dataset.prior_loss_weight == 1.0:
            return None
        _, indices = self._indices(step, micro)
        return torch.tensor([self.dataset.loss_weight(i) for i in indices], dtype=torch.float32)

    def _loss_masks(self, step: int, micro: int) -> torch.Tensor | None:
        """Masked loss: the micro-batch's masks (B x 1 x H x W at pixel size), read from the files with each sample's
        crop and flip; None when no subset uses masked loss."""
        ds = self.dataset
        if not ds.uses_masks:
            return None
        epoch, indices = self._indices(step, micro)
        return torch.stack([ds.mask_for(epoch, i, flip=ds.flip_for(epoch, i)) for i in indices])

    def position_at(self, step: int) -> None:
        """Reset the data position to optimizer step `step` (start, resume, benchmarks)."""
        self._epoch_batches = {}
        self._prefetched = {}
        self.epoch = step // self.steps_per_epoch

    def train_step(self, step: int) -> float | None:
        """One optimizer step (with gradient accumulation). Returns the loss, or None if it was NaN/inf and skipped."""
        cfg, acc = self.config, self.accelerator
        step_loss = 0.0
        self.data_seconds = 0.0  # time the step waited for its batch: near zero unless data loading starves it
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            latents, cond = self._next_batch(step, micro)
            weights = self._loss_weights(step, micro)
            mask = self._loss_masks(step, micro)
            self.data_seconds += time.perf_counter() - t0
            last_micro = micro == cfg.grad_accum - 1
            # Under DDP, only the last micro-batch all-reduces gradients.
            with contextlib.nullcontext() if last_micro else acc.no_sync(self.unet):
                loss = self._loss(latents, cond, step, micro, weights, mask)
                if not torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                acc.backward(loss / cfg.grad_accum)
            step_loss += loss.detach().item() / cfg.grad_accum
        if cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            if not torch.isfinite(torch.as_tensor(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def run(self) -> TrainResult:
        """Train to the end (or a stop request). With log_with = tensorboard, loss, lr and val_loss also go to
        accelerate's TensorBoard tracker under OUTPUT/logs/tensorboard."""
        self._tracking = self.config.log_with == "tensorboard"
        if not self._tracking:
            return self._run()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers("tensorboard")
        try:
            return self._run()
        finally:
            self.accelerator.end_training()

    def _track(self, values: dict, step: int) -> None:
        if getattr(self, "_tracking", False):
            self.accelerator.log(values, step=step)

    def _run(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "train_log.jsonl"
        if acc.is_main_process and self.start_step == 0 and log_path.exists():
            log_path.unlink()
        step = self.start_step
        self.position_at(step)
        nonfinite = 0
        last_loss = None
        self.started_at = time.time()
        t_prev = time.perf_counter()
        self.emit("status", step=step, message=self.plan.describe(), plan=self.plan.__dict__)
        self.emit("start", step=step, total=self.total_steps, images=self.data.num_images, samples=len(self.dataset))
        self.unet.train()
        while step < self.total_steps:
            if self.stop_event.is_set():
                self.emit("status", step=step, message="Stop requested: saving a checkpoint.")
                self._checkpoint(step)
                return self._finish(step, last_loss, stopped=True)
            loss = self.train_step(step)
            step += 1
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)
            if loss is None:
                nonfinite += 1
                self.emit("warning", step=step, message=f"Step {step}: loss or gradient is NaN/inf; step skipped.")
                if nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                    raise TrainingError(
                        f"Training stopped: {nonfinite} steps in a row gave NaN/inf loss. Likely causes: learning rate too high "
                        f"(now {cfg.lr}), fp16 overflow (try bf16 or 'no' mixed precision, and keep the VAE in fp32). "
                        f"The last good checkpoint is kept under {self.out_dir / 'checkpoints'}.")
                continue
            nonfinite = 0
            last_loss = loss
            now = time.perf_counter()
            seconds, t_prev = now - t_prev, now
            lr = self.scheduler.get_last_lr()[0]
            self._log(log_path, step, loss, lr, seconds, self.epoch)
            self._track({"loss": loss, "lr": lr}, step)
            self.emit("step", step=step, loss=loss, lr=lr, seconds=seconds, data_seconds=self.data_seconds, epoch=self.epoch)
            if self.validation is not None and cfg.validate_every and step % cfg.validate_every == 0:
                self._validate(step)
                t_prev = time.perf_counter()
            if cfg.sample_every and step % cfg.sample_every == 0 and step < self.total_steps:
                self._safe_sample(step)
                t_prev = time.perf_counter()  # previews are not training time
            if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                self._checkpoint(step)
                t_prev = time.perf_counter()
        if self.validation is not None and not (cfg.validate_every and step % cfg.validate_every == 0):
            self._validate(step)  # the end of the run is always validated
        return self._finish(step, last_loss, stopped=False)

    def _log(self, path: Path, step: int, loss: float, lr: float, seconds: float, epoch: int) -> None:
        self._write_log(path, step, {"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 5),
                                     "data_seconds": round(self.data_seconds, 5), "epoch": epoch})

    def _write_log(self, path: Path, step: int, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not end the run over a log line
            if not getattr(self, "_log_failed", False):
                self._log_failed = True
                self.emit("warning", step=step, message=f"Cannot write {path} ({exc.strerror or exc}); training continues "
                          "without the step log.")

    def _on_unreadable(self, path: Path, reason: str, stand_in: Path | None) -> None:
        """An image that loaded at the scan fails now (deleted, truncated, undecodable): say so once; it is skipped."""
        instead = f"; its samples use {stand_in.name} instead" if stand_in is not None else ""
        self.emit("warning", message=f"Image {path} cannot be read any more ({reason}): skipped for the rest of the run{instead}.")

    # previews, checkpoints, export ---------------------------------------------
    def _safe_sample(self, step: int) -> list[Path]:
        """Previews are a nicety: one that fails (a bad prompt option, a full disk) is a warning, never the end of a run."""
        try:
            return self._sample(step)
        except Exception as exc:  # noqa: BLE001 - the run (and its LoRA) matter more than a preview
            from ..errorlog import what_went_wrong, write_traceback

            log = write_traceback(exc, context=f"preview at step {step}", out_dir=self.out_dir)
            self.emit("warning", step=step, message=f"Preview at step {step} failed ({what_went_wrong(exc)}); training is "
                      f"not affected.{f' Details: {log}.' if log else ''}")
            return []

    def _sample(self, step: int) -> list[Path]:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process or not self.sample_prompts:
            return []
        unet = acc.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        # Encoders are None once dropped: then the prompts' cached embeddings stand in.
        encoders = [acc.unwrap_model(te) if te is not None else None for te in self.text_encoders]
        live = encoders[0] is not None
        vae_device, te_devices = self.base.vae.device, [te.device if te is not None else None for te in encoders]
        self.base.vae.to(self.device)
        for te in encoders:
            if te is not None:
                te.to(self.device)
        pipe = self.base.make_pipeline(unet=unet, text_encoders=encoders)
        pipe.set_progress_bar_config(disable=True)
        paths = []
        try:
            for i, sample in enumerate(self.sample_prompts):
                embeds = None if live else self.family.prompt_embeds_kwargs(
                    self.text_cache.get([sample.prompt]), self.text_cache.get([sample.negative]))
                with acc.autocast():
                    img = generate(pipe, sample, default_size=self.config.resolution, default_steps=self.config.sample_steps,
                                   default_seed=self.config.seed + i, prompt_embeds=embeds)
                path = save_png_atomic(img, self.out_dir / "samples" / sample_filename(step, i))
                paths.append(path)
        finally:
            self.base.vae.to(vae_device)
            for te, device in zip(encoders, te_devices):
                if te is not None:
                    te.to(device)
            if was_training:
                unet.train()
        self.samples.extend(paths)
        self.emit("sample", step=step, paths=[str(p) for p in paths], prompts=[s.prompt for s in self.sample_prompts])
        return paths

    def adapted_modules(self) -> dict:
        """Component name -> the (unwrapped) module carrying this run's LoRA: the UNet and each trained encoder."""
        acc = self.accelerator
        modules = {"unet": acc.unwrap_model(self.unet)}
        modules.update({self.te_names[i]: acc.unwrap_model(self.text_encoders[i]) for i in self.trained_te})
        return modules

    def _metadata(self, step: int, finished: float | None) -> dict[str, str]:
        from ..safetext import (
            clean_text,  # safetensors metadata must be valid UTF-8 (paths may not be)
        )

        return {k: clean_text(v) for k, v in self._raw_metadata(step, finished).items()}

    def _raw_metadata(self, step: int, finished: float | None) -> dict[str, str]:
        return build_metadata(config=self.config, base=self.base, num_images=self.dataset.num_train_samples,
                              tag_frequency=self.data.tag_frequency, data=self.data, steps_done=step, epochs_done=step // self.steps_per_epoch,
                              started_at=self.started_at, finished_at=finished, unet_modules=len(self.unet_modules),
                              te_modules=sum(len(m) for m in self.te_modules.values()))

    def export(self, path: Path, step: int, *, finished: float | None = None, precision: str | None = None, fmt: str | None = None) -> Path:
        writer = export_diffusers if (fmt or self.config.format) == "diffusers" else export_kohya
        return writer(path, self.family, self.adapted_modules(), metadata=self._metadata(step, finished),
                      precision=precision or self.config.save_precision)

    def _checkpoint(self, step: int) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        try:
            path = save_checkpoint(self.out_dir, step, modules=self.adapted_modules(), optimizer=self.optimizer, scheduler=self.scheduler,
                                   config=self.config, export=lambda p: self.export(p, step))
        except Exception as exc:  # noqa: BLE001 - a full disk raises OSError, RuntimeError (torch.save) or SafetensorError
            from ..errorlog import write_failure

            self.emit("warning", step=step, message=f"Could not save checkpoint at step {step}: {write_failure(exc, self.out_dir)}. "
                      "The previous checkpoint is kept; training continues.")
            return None
        self.checkpoints.append(path)
        self.emit("checkpoint", step=step, path=str(path))
        return path

    def _export_final(self, step: int) -> Path:
        """Write the finished LoRA. If its place cannot take it (full disk, read-only folder, a folder in the way), it goes
        to a fallback folder with a warning; only when every place fails does the run end, with a sentence naming the
        path, why, and the newest checkpoint to resume from."""
        from ..errorlog import write_failure
        from ..outputs import OutputError
        from ..paths import cache_dir

        target = self.out_dir / f"{self.config.output_name}.safetensors"
        finished = time.time()
        try:
            return self.export(target, step, finished=finished)
        except Exception as exc:  # noqa: BLE001 - OSError, OutputError, and safetensors' SafetensorError on a full disk
            why = str(exc) if isinstance(exc, OutputError) else write_failure(exc, target)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        tried = []
        for folder in (cache_dir() / "rescued", Path(tempfile.gettempdir()) / "sdlora-rescued"):
            rescue = folder / f"{self.config.output_name}-{stamp}.safetensors"
            tried.append(str(folder))
            try:
                path = self.export(rescue, step, finished=finished)
            except Exception:  # noqa: BLE001 - try the next place
                continue
            self.emit("warning", step=step, message=f"Could not write the LoRA to {target} ({why}). It was saved to {path} "
                      "instead: move it where you want it.")
            return path
        from .resume import candidates

        newest = next(iter(candidates(self.out_dir)), None)
        keep = (f"The newest checkpoint is {newest}: free some space and run again with --resume latest to write the LoRA."
                if newest else "No checkpoint was saved (save_every is off), so this run's weights are lost.")
        raise TrainingError(f"Could not write the LoRA to {target} ({why}), nor to {' or '.join(tried)}. {keep}")

    def _finish(self, step: int, last_loss: float | None, *, stopped: bool) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        lora_path = None
        if acc.is_main_process:  # the LoRA first: nothing after this point may lose it
            lora_path = self._export_final(step)
        if not stopped and self.sample_prompts:
            self._safe_sample(step)
        if acc.is_main_process:
            self.emit("done", step=step, path=str(lora_path), stopped=stopped, loss=last_loss)
        return TrainResult(lora_path=lora_path, output_dir=self.out_dir, steps=step, final_loss=last_loss, samples=list(self.samples),
                           checkpoints=list(self.checkpoints), stopped_early=stopped)


def train(config: TrainConfig, *, on_event: Callable[[TrainEvent], None] | None = None,
          stop_event: threading.Event | None = None) -> TrainResult:
    """Train a LoRA as configured. Raises ConfigError/DatasetError/ModelLoadError/TrainingError with user-facing messages.
    The output folder is locked for the run (by the main process), so two runs never write into one folder."""
    from ..outputs import output_lock

    trainer = Trainer(config, on_event=on_event, stop_event=stop_event)
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    with output_lock(config.output_path()) if main_process else contextlib.nullcontext():
        trainer.prepare()
        return trainer.run()
