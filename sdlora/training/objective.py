"""The diffusion objective, one for the training loss and the validation loss: noise the latents at the given
timesteps, let the UNet (through family.unet_forward) predict the noise (epsilon) or the velocity (v-prediction), and
take the loss (sdlora.training.losses); the step's noise and timesteps come from sdlora.training.noise.

`run` is the prepared Trainer: its noise scheduler, prediction type, family, device, compute dtype and accelerator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import Conditioning
from .losses import debiased_weights, elementwise_loss, huber_threshold, min_snr_weights
from .noise import draw_noise, draw_timesteps, input_noise

__all__ = ["denoising_error", "latent_mask", "masked_mean", "min_snr_weights", "training_loss"]


def denoising_error(run, unet, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    cond: Conditioning, noised_with: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss (B x C x h x w, fp32; the config's loss_type) of `unet`'s prediction for `latents` noised with
    `noised_with` (input perturbation), else with `noise`; the target is always made from `noise`."""
    cfg, scheduler = run.config, run.noise_scheduler
    noisy = scheduler.add_noise(latents, noise if noised_with is None else noised_with, timesteps)
    target = noise if run.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if run.device.type == "cuda":
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    with run.accelerator.autocast():
        pred = run.family.unet_forward(unet, noisy.to(run.weight_dtype), timesteps, cond.to(run.device, run.weight_dtype))
    c = huber_threshold(cfg.loss_type, cfg.huber_schedule, cfg.huber_c, scheduler, timesteps)
    return elementwise_loss(pred.float(), target.float(), cfg.loss_type, c)


def training_loss(run, latents: torch.Tensor, cond: Conditioning, step: int, micro: int,
                  weights: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the per-sample losses times `weights` (kohya's loss_weights: prior_loss_weight for reg samples).
    `mask` (B x 1 x H x W in [0, 1], any size; masked loss) weights the per-pixel loss after area-averaging to the
    latent size; each sample's loss is divided by its mask's mean, so it stays the mean over the learned area."""
    cfg = run.config
    # Noise and timesteps depend only on (seed, step, micro-batch, process): resume reproduces them exactly.
    gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro, run.accelerator.process_index)) & 0x7FFFFFFF)
    latents = latents.float()
    noise = draw_noise(cfg, latents.shape, gen)
    timesteps = draw_timesteps(cfg, run.noise_scheduler.config.num_train_timesteps, latents.shape[0], gen)
    perturbed = input_noise(cfg, noise, gen)
    noise, timesteps = noise.to(run.device), timesteps.to(run.device)
    perturbed = None if perturbed is None else perturbed.to(run.device)
    loss = denoising_error(run, run.unet, latents, noise, timesteps, cond, perturbed)
    loss = masked_mean(loss, mask) if mask is not None else loss.mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weights(run.noise_scheduler, timesteps, cfg.min_snr_gamma, run.prediction_type).to(loss.device)
    if cfg.debiased_estimation_loss:
        loss = loss * debiased_weights(run.noise_scheduler, timesteps, run.prediction_type).to(loss.device)
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    return loss.mean()


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A B x 1 x H x W pixel mask downscaled to the latent `size` (h, w) by area averaging."""
    mask = mask.float()
    return mask if tuple(mask.shape[-2:]) == tuple(size) else F.interpolate(mask, size=tuple(size), mode="area")


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of a B x C x h x w per-pixel loss weighted by `mask` (B x 1 x H x W, area-averaged to h x w),
    divided by the mask's mean: the mean loss over the learned pixels (0 for a sample with an all-black mask)."""
    m = latent_mask(mask, loss.shape[-2:]).to(loss.device, loss.dtype)
    return (loss * m).mean(dim=(1, 2, 3)) / m.mean(dim=(1, 2, 3)).clamp_min(1e-6)
