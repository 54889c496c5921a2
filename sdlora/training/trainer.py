"""The training loop (accelerate), in the order of diffusers' train_text_to_image_lora.py: `prepare()` runs the set-up
steps (sdlora.training.setup), `run()` is the loop, `train_step()` one optimizer step. Progress goes out as typed
events (sdlora.training.events); the CLI and the UI only listen.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config.train_config import TrainConfig
from ..families import Conditioning
from . import batches, previews, saving, setup
from .checkpoints import checkpoint_root
from .errors import TrainingError
from .events import DoneEvent, PlanEvent, StartEvent, StatusEvent, StepEvent, TrainEvent, WarningEvent
from .max_norm import apply_max_norm
from .objective import training_loss
from .train_log import TrainLog
from .validation import encode_validation, validate

MAX_CONSECUTIVE_NONFINITE = 3
# Test hook: slows every step so kill -9 tests can land mid-run on a fast machine.
_STEP_DELAY = float(os.environ.get("SDLORA_STEP_DELAY", "0") or 0)

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]


@dataclass
class TrainResult:
    lora_path: Path | None
    output_dir: Path
    steps: int
    final_loss: float | None
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stopped_early: bool = False


class Trainer:
    """One run: `prepare()` builds its state (data, model, adapters, caches, optimizer), `run()` trains it."""

    accelerator = None
    started_at: float | None = None
    norm_stats = None  # scale_weight_norms: what the last step's max-norm regularisation did

    def __init__(self, config: TrainConfig, on_event: Callable[[TrainEvent], None] | None = None,
                 stop_event: threading.Event | None = None, base=None, owns_base: bool | None = None):
        self.config = config
        self.given_base = base
        # A model loaded for this run may lose the parts the run no longer needs; one handed in by the caller may not.
        self.owns_base = base is None if owns_base is None else owns_base
        self.on_event = on_event or (lambda e: None)
        self.stop_event = stop_event or threading.Event()
        self.out_dir = config.output_path()
        self.samples: list[Path] = []
        self.checkpoints: list[Path] = []
        self.epoch_batches: dict = {}

    def emit(self, event_type: type[TrainEvent], step: int = 0, **fields) -> None:
        """Send one event of `event_type` (main process only)."""
        if self.accelerator is None or self.accelerator.is_main_process:
            self.on_event(event_type(step=step, total_steps=getattr(self, "total_steps", 0), **fields))

    def prepare(self) -> None:
        setup.load_data(self)
        setup.start_accelerator(self)
        t0 = time.perf_counter()
        setup.load_model(self)
        n_params = setup.inject_adapters(self)
        setup.choose_residency(self)
        setup.check_memory(self, n_params)
        setup.place_modules(self)
        setup.plan_steps(self)
        encode_validation(self)  # while the VAE encoder is still here
        setup.cache_latents(self)
        setup.cache_text(self)
        batches.open_readers(self)
        setup.build_optimizer(self)
        setup.resume(self)
        self.time_to_prepare = time.perf_counter() - t0

    # what one step reads -------------------------------------------------------
    def _indices(self, step: int, micro: int) -> tuple[int, list[int]]:
        return batches.indices(self, step, micro)

    def _batch(self, epoch: int, indices: list[int], pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning]:
        return batches.batch(self, epoch, indices, pixels)

    def _next_batch(self, step: int, micro: int) -> tuple[torch.Tensor, Conditioning]:
        return batches.next_batch(self, step, micro)

    def _loss_weights(self, step: int, micro: int) -> torch.Tensor | None:
        return batches.loss_weights(self, step, micro)

    def _loss_masks(self, step: int, micro: int) -> torch.Tensor | None:
        return batches.loss_masks(self, step, micro)

    def position_at(self, step: int) -> None:
        """Reset the data position to optimizer step `step` (start, resume, benchmarks)."""
        batches.position_at(self, step)

    def _loss(self, latents: torch.Tensor, cond: Conditioning, step: int, micro: int,
              weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return training_loss(self, latents, cond, step, micro, weights, mask)

    # one step ------------------------------------------------------------------
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
        if cfg.scale_weight_norms:
            self.norm_stats = apply_max_norm(self.adapted_modules().values(), cfg.scale_weight_norms)
        return step_loss

    # the loop ------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the end (or a stop request). With log_with = tensorboard, loss, lr and val_loss also go to
        accelerate's TensorBoard tracker under OUTPUT/logs/tensorboard."""
        tracking = self.config.log_with == "tensorboard"
        self.train_log = TrainLog(self.out_dir, self.accelerator, tracking=tracking,
                                  warn=lambda step, message: self.emit(WarningEvent, step=step, message=message))
        if not tracking:
            return self._run()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.init_trackers("tensorboard")
        try:
            return self._run()
        finally:
            self.accelerator.end_training()

    def _run(self) -> TrainResult:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.train_log.start(self.start_step)
        step = self.start_step
        self.position_at(step)
        nonfinite = 0
        last_loss = None
        self.started_at = time.time()
        t_prev = time.perf_counter()
        self.emit(PlanEvent, step=step, message=self.plan.describe(), plan=self.plan.__dict__)
        self.emit(StartEvent, step=step, total=self.total_steps, images=self.data.num_images, samples=len(self.dataset))
        self.unet.train()
        while step < self.total_steps:
            if self.stop_event.is_set():
                self.emit(StatusEvent, step=step, message="Stop requested: saving a checkpoint.")
                saving.checkpoint(self, step)
                return self._finish(step, last_loss, stopped=True)
            loss = self.train_step(step)
            step += 1
            if _STEP_DELAY:
                time.sleep(_STEP_DELAY)
            if loss is None:
                nonfinite += 1
                self._skipped_step(step, nonfinite)
                continue
            nonfinite = 0
            last_loss = loss
            now = time.perf_counter()
            seconds, t_prev = now - t_prev, now
            lr = self.scheduler.get_last_lr()[0]
            norms = self.norm_stats.log_fields() if self.norm_stats is not None else None
            self.train_log.step(step, loss, lr, seconds, self.data_seconds, self.epoch, extra=norms)
            self.emit(StepEvent, step=step, loss=loss, lr=lr, seconds=seconds, data_seconds=self.data_seconds, epoch=self.epoch)
            if self._after_step(step):
                t_prev = time.perf_counter()  # validation, previews and checkpoints are not training time
        if self.validation is not None and not (cfg.validate_every and step % cfg.validate_every == 0):
            validate(self, step)  # the end of the run is always validated
        return self._finish(step, last_loss, stopped=False)

    def _skipped_step(self, step: int, nonfinite: int) -> None:
        self.emit(WarningEvent, step=step, message=f"Step {step}: loss or gradient is NaN/inf; step skipped.")
        if nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingError(
                f"Training stopped: {nonfinite} steps in a row gave NaN/inf loss. Likely causes: learning rate too high "
                f"(now {self.config.lr}), fp16 overflow (try bf16 or 'no' mixed precision, and keep the VAE in fp32). "
                f"The last good checkpoint is kept under {checkpoint_root(self.out_dir)}.")

    def _after_step(self, step: int) -> bool:
        """Validation, previews and a checkpoint when they are due at `step`; True if any ran."""
        cfg = self.config
        ran = False
        if self.validation is not None and cfg.validate_every and step % cfg.validate_every == 0:
            validate(self, step)
            ran = True
        if cfg.sample_every and step % cfg.sample_every == 0 and step < self.total_steps:
            previews.safe_sample(self, step)
            ran = True
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            saving.checkpoint(self, step)
            ran = True
        return ran

    def _finish(self, step: int, last_loss: float | None, *, stopped: bool) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        lora_path = None
        if acc.is_main_process:  # the LoRA first: nothing after this point may lose it
            lora_path = saving.export_final(self, step)
        if not stopped and self.sample_prompts:
            previews.safe_sample(self, step)
        if acc.is_main_process:
            self.emit(DoneEvent, step=step, path=str(lora_path), stopped=stopped, loss=last_loss)
        return TrainResult(lora_path=lora_path, output_dir=self.out_dir, steps=step, final_loss=last_loss,
                           samples=list(self.samples), checkpoints=list(self.checkpoints), stopped_early=stopped)

    # what the run writes -------------------------------------------------------
    def adapted_modules(self) -> dict:
        """Component name -> the (unwrapped) module carrying this run's LoRA: the UNet and each trained encoder."""
        return saving.adapted_modules(self)

    def export(self, path: Path, step: int, *, finished: float | None = None, precision: str | None = None,
               fmt: str | None = None) -> Path:
        return saving.export(self, path, step, finished=finished, precision=precision, fmt=fmt)


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
