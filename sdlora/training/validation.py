"""Validation loss: the training objective on held-out images, at fixed noise and timesteps, so values compare
across steps, runs and resumes.

`run` is the prepared Trainer.
"""

from __future__ import annotations

import torch

from ..data.caches import LatentCache
from ..data.draws import seeded_rng
from ..families import TextEmbedding
from .events import StatusEvent, ValidationEvent, WarningEvent
from .objective import denoising_error

# Each validation image is noised at this many fixed timesteps, spread over the schedule.
VALIDATION_TIMESTEPS = 4


def encode_validation(run) -> None:
    """Encode the validation images once (centre crop, no flip) while the VAE encoder is still here, and fix each
    sample's caption (no shuffle or dropout) and size conditioning."""
    val = run.validation = run.data.validation
    run.val_latents, run.val_captions, run.val_geometry = [], [], []
    if val is None:
        return
    run.emit(StatusEvent, message=f"Encoding {len(val.entries)} validation image(s) ...")
    encoder = LatentCache(run.base.vae, vae_id="", cache_dir=None, device=run.device)
    encoder.build(val, flips=(False,))
    run.val_latents = [encoder.get(e.item_index, False) for e in val.entries]
    run.val_captions = [val.fixed_caption(e.item_index) for e in val.entries]
    run.val_geometry = [val.geometry_for(0, k, flip=False) for k in range(len(val.entries))]


@torch.no_grad()
def validation_loss(run) -> float:
    """Mean MSE over the validation images, each at VALIDATION_TIMESTEPS timesteps spread over the schedule, with
    noise and timesteps seeded from (seed, "validation", index): the same numbers at every step, in every run and
    after a resume, so the values compare. Eval mode, no gradients, through the training's conditioning and
    family.unet_forward."""
    cfg, acc = run.config, run.accelerator
    unet = acc.unwrap_model(run.unet)
    encoders = [acc.unwrap_model(te) if te is not None else None for te in run.text_encoders]
    trained = [unet] + [encoders[i] for i in run.trained_te]
    modes = [m.training for m in trained]
    for m in trained:
        m.eval()
    n_t, horizon = VALIDATION_TIMESTEPS, run.noise_scheduler.config.num_train_timesteps
    total = 0.0
    try:
        for k, latent in enumerate(run.val_latents):
            gen = torch.Generator().manual_seed(seeded_rng(cfg.seed, "validation", k).getrandbits(63))
            latents = latent.float().unsqueeze(0).repeat(n_t, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=gen)
            offset = torch.rand((), generator=gen).item()
            timesteps = ((torch.arange(n_t) + offset) * horizon / n_t).long().clamp(0, horizon - 1)
            latents, noise, timesteps = latents.to(run.device), noise.to(run.device), timesteps.to(run.device)
            caption = [run.val_captions[k]]
            if run.trained_te:
                text = run.family.encode(encoders, run.base.tokenizers, caption, run.device, cfg.clip_skip)
            else:
                text = run.text_cache.get(caption)
            text = TextEmbedding.stack(text.rows() * n_t)
            cond = run.family.conditioning(text, [run.val_geometry[k]] * n_t)
            total += denoising_error(run, unet, latents, noise, timesteps, cond).mean().item()
    finally:
        for m, mode in zip(trained, modes):
            m.train(mode)
    return total / len(run.val_latents)


def validate(run, step: int) -> float | None:
    """Validation loss at `step`: logged to train_log.jsonl and sent as a ValidationEvent (main process)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if run.validation is None or not acc.is_main_process:
        return None
    try:
        value = validation_loss(run)
    except Exception as exc:  # noqa: BLE001 - like previews, a failed validation must not end the run
        from ..errorlog import what_went_wrong

        run.emit(WarningEvent, step=step, message=f"Validation at step {step} failed ({what_went_wrong(exc)}); training "
                 "continues.")
        return None
    run.train_log.validation(step, value)
    run.emit(ValidationEvent, step=step, val_loss=value)
    return value
