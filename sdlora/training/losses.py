"""The per-element loss (l2, or kohya's pseudo-Huber losses with a scheduled threshold) and the per-sample SNR
weightings (min-SNR, debiased estimation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def huber_threshold(loss_type: str, schedule: str, huber_c: float, scheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Per-sample Huber threshold c_t for huber/smooth_l1 (None for l2): constant c; exponential, from 1 at t = 0 down
    to c at the last timestep; snr, from 1 where there is no noise down towards c as the noise grows."""
    if loss_type == "l2":
        return None
    t = timesteps.long()
    if schedule == "constant":
        return torch.full(t.shape, float(huber_c), device=t.device)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t.float())
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device)[t].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None) -> torch.Tensor:
    """B x C x h x w loss: squared error, huber 2c(sqrt(d² + c²) - c) or smooth_l1 2(sqrt(d² + c²) - c)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    c = c.view(-1, *([1] * (pred.dim() - 1))).to(pred.device, pred.dtype)
    soft = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * soft if loss_type == "huber" else 2 * soft


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    s = snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        return torch.clamp(s, max=gamma) / (s + 1)
    return torch.clamp(s, max=gamma) / s


def debiased_weights(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation: 1/sqrt(SNR) with SNR capped at 1000 (the low-noise end); 1/(SNR + 1) for v-prediction,
    whose target already carries a factor of the SNR (as kohya weighs it)."""
    s = torch.clamp(snr(scheduler, timesteps), max=1000)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(s)
