"""A rough memory estimate before training starts, so a run that cannot fit warns instead of dying at step 1.

Activations are estimated from the UNet size and the latent area, calibrated on the usual figure for
SD1.5 at 512 px, batch 1, half precision: about 3.5 GB of activations without gradient checkpointing
and about a quarter of that with it. It is an estimate: the warning says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ACT_BYTES_PER_PARAM_PER_SAMPLE = 4.0  # at a 64x64 latent (512 px), half precision
_CHECKPOINTING_FACTOR = 0.25


@dataclass
class MemoryEstimate:
    weights: int
    trainable: int
    activations: int
    available: int | None
    device: str

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations

    def fits(self) -> bool:
        return self.available is None or self.total <= 0.95 * self.available

    def describe(self) -> str:
        gib = 1024 ** 3
        avail = f"{self.available / gib:.1f} GiB available" if self.available is not None else "availability unknown"
        return (f"estimated peak memory on {self.device}: {self.total / gib:.1f} GiB (weights {self.weights / gib:.1f}, "
                f"LoRA+optimizer {self.trainable / gib:.2f}, activations {self.activations / gib:.1f}); {avail}")


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def estimate_training_memory(*, unet, text_encoder, vae, lora_params: int, config, device: torch.device,
                             vae_on_device: bool) -> MemoryEstimate:
    half = config.mixed_precision in ("fp16", "bf16")
    wbytes = 2 if half else 4
    unet_n = _n_params(unet)
    weights = unet_n * wbytes + _n_params(text_encoder) * (4 if config.train_text_encoder else wbytes)
    if vae_on_device or not config.cache_latents:
        weights += _n_params(vae) * 4
    state_bytes = 6 if config.optimizer == "adamw8bit" else 16  # param + grad + two Adam moments, fp32
    trainable = lora_params * state_bytes
    latent_area = (config.resolution // 8) ** 2
    act = _ACT_BYTES_PER_PARAM_PER_SAMPLE * unet_n * (latent_area / 4096) * config.batch_size
    if not half:
        act *= 2
    if config.gradient_checkpointing:
        act *= _CHECKPOINTING_FACTOR
    return MemoryEstimate(weights=int(weights), trainable=int(trainable), activations=int(act),
                          available=available_memory(device), device=str(device))
