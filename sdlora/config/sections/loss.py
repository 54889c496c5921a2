"""Which loss a step takes and how its noise is drawn: kohya's timestep range, Huber losses, pyramid and input-
perturbation noise, zero terminal SNR, debiased estimation, and max-norm regularisation of the adapter."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ...adapters.rules import needs_lycoris
from ..checks import fraction, non_negative_float
from ..flags import Flag

LossType = Literal["l2", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
MAX_TIMESTEP = 1000  # the DDPM schedules of SD1, SD2 and SDXL have 1000 training timesteps


class LossSettings(BaseModel):
    min_timestep: Annotated[int | None, Flag("--min-timestep")] = Field(
        None, description="lowest timestep trained on (0-999); unset = 0")
    max_timestep: Annotated[int | None, Flag("--max-timestep")] = Field(
        None, description="timesteps are drawn below this (1-1000); unset = 1000")
    loss_type: Annotated[LossType, Flag("--loss-type")] = Field(
        "l2", description="l2 (squared error), huber or smooth_l1 (pseudo-Huber, robust to outliers)")
    huber_c: Annotated[float, Flag("--huber-c")] = Field(
        0.1, description="Huber threshold (0 < c <= 1), scheduled over the timesteps by huber_schedule")
    huber_schedule: Annotated[HuberSchedule, Flag("--huber-schedule")] = Field(
        "snr", description="how huber_c varies with the timestep: constant, exponential or snr")
    multires_noise_iterations: Annotated[int, Flag("--multires-noise-iterations")] = Field(
        0, description="pyramid (multi-resolution) noise: levels added to the noise (6-10 is usual; 0 = off)")
    multires_noise_discount: Annotated[float, Flag("--multires-noise-discount")] = Field(
        0.3, description="pyramid noise: each coarser level's weight is this times the previous one's")
    ip_noise_gamma: Annotated[float, Flag("--ip-noise-gamma")] = Field(
        0.0, description="input perturbation: extra noise in the noisy latents only, the target stays (0.1 is usual)")
    zero_terminal_snr: Annotated[bool, Flag("--zero-terminal-snr", sets=True)] = Field(
        False, description="rescale the betas so the last timestep is pure noise (v-prediction models only)")
    debiased_estimation_loss: Annotated[bool, Flag("--debiased-estimation-loss", sets=True)] = Field(
        False, description="weight each sample's loss by 1/sqrt(SNR) (debiased estimation)")
    scale_weight_norms: Annotated[float | None, Flag("--scale-weight-norms")] = Field(
        None, description="max-norm regularisation: scale down each LoRA module whose up x down norm exceeds this "
                          "(1 is usual); unset = off")

    _loss_amounts = field_validator("ip_noise_gamma")(non_negative_float)
    _shares = field_validator("huber_c", "multires_noise_discount")(
        fraction({"huber_c": 0.1, "multires_noise_discount": 0.3}))

    @field_validator("min_timestep", "max_timestep")
    @classmethod
    def _timestep_range(cls, v: int | None, info) -> int | None:
        low = 0 if info.field_name == "min_timestep" else 1
        if v is not None and not low <= v <= MAX_TIMESTEP:
            raise ValueError(f"must be between {low} and {MAX_TIMESTEP}")
        return v

    @field_validator("multires_noise_iterations")
    @classmethod
    def _iterations(cls, v: int) -> int:
        if not 0 <= v <= 64:
            raise ValueError("must be between 0 (off) and 64 (6-10 is usual)")
        return v

    @field_validator("scale_weight_norms")
    @classmethod
    def _max_norm(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError("must be a positive number (1 is usual), or unset to turn it off")
        return v

    @model_validator(mode="after")
    def _loss_rules(self):
        low, high = self.min_timestep or 0, MAX_TIMESTEP if self.max_timestep is None else self.max_timestep
        if low >= high:
            raise ValueError(f"min_timestep ({low}) must be below max_timestep ({high}): timesteps are drawn from "
                             "[min_timestep, max_timestep)")
        if self.multires_noise_iterations and getattr(self, "noise_offset", 0):
            raise ValueError("noise_offset and multires_noise_iterations are both set: use one kind of extra noise "
                             "(clear noise_offset or set multires_noise_iterations to 0)")
        if self.zero_terminal_snr and getattr(self, "prediction_type", "auto") == "epsilon":
            raise ValueError("zero_terminal_snr needs a v-prediction model: at the last timestep an epsilon model "
                             "has nothing to predict from. Set prediction_type = v_prediction or turn it off")
        if self.scale_weight_norms and hasattr(self, "network") and needs_lycoris(self):
            raise ValueError("scale_weight_norms works on plain LoRA/LoCon up and down matrices (as kohya's does): "
                             "clear it, or train network lora/locon without dora, tucker, rank_dropout or "
                             "module_dropout")
        return self
