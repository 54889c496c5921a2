"""How a training step draws its noise and timesteps (kohya's options): the noise offset, pyramid (multi-resolution)
noise, input perturbation, the timestep range, and the zero-terminal-SNR training scheduler.

Every draw comes from the step's own generator, in a fixed order, so a resumed run draws the same numbers; options
left at their defaults draw nothing extra, so runs without them stay bit-identical."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config.train_config import ConfigError


def training_scheduler(scheduler, *, zero_terminal_snr: bool):
    """The run's DDPM scheduler: the base model's own, or a copy whose betas are rescaled to zero terminal SNR
    (the base model's scheduler is shared and is never changed)."""
    if not zero_terminal_snr:
        return scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


def check_objective(run) -> None:
    """Refuse options that the loaded model settles: clip_skip per family, zero terminal SNR without v-prediction,
    a timestep range beyond the schedule."""
    cfg = run.config
    problem = run.family.clip_skip_problem(cfg.clip_skip, [te for te in run.base.text_encoders if te is not None])
    if problem:
        raise ConfigError(problem)
    if cfg.zero_terminal_snr and run.prediction_type != "v_prediction":
        raise ConfigError(f"zero_terminal_snr needs a v-prediction model, and {cfg.base_model} predicts "
                          f"{run.prediction_type}: at the last timestep there is no signal to predict the noise from. "
                          "Turn zero_terminal_snr off, or train a v-prediction model (prediction_type = v_prediction).")
    horizon = run.base.noise_scheduler.config.num_train_timesteps
    low, high = timestep_range(cfg, horizon)
    if low >= high:
        raise ConfigError(f"min_timestep {cfg.min_timestep}: this model's schedule has {horizon} timesteps, so "
                          f"min_timestep must be below {min(high, horizon)}.")


def timestep_range(cfg, horizon: int) -> tuple[int, int]:
    """[low, high) of the timesteps a step draws from."""
    high = horizon if cfg.max_timestep is None else min(cfg.max_timestep, horizon)
    return cfg.min_timestep or 0, high


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: `noise` plus noise drawn at ever coarser sizes (each 2-4x smaller than the last, the
    factor drawn per level), upsampled bilinearly and weighted by discount**level, scaled back to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for level in range(iterations):
        factor = (torch.rand((), generator=generator).item() * 2 + 2) ** level
        hn, wn = max(1, int(h / factor)), max(1, int(w / factor))
        coarse = torch.randn((b, c, hn, wn), generator=generator)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** level
        if hn == 1 or wn == 1:  # nothing coarser than one pixel
            break
    return out / out.std()


def draw_noise(cfg, shape, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    return noise


def draw_timesteps(cfg, horizon: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    low, high = timestep_range(cfg, horizon)
    return torch.randint(low, high, (batch,), generator=generator)


def input_noise(cfg, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """Input perturbation (ip_noise_gamma): the noise the latents are noised with, while the target stays `noise`;
    None when off."""
    if not cfg.ip_noise_gamma:
        return None
    return noise + cfg.ip_noise_gamma * torch.randn(noise.shape, generator=generator)
