"""How each step learns: learning rate, batch, optimizer, loss weighting, precision and speed."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from ..checks import at_most, non_negative_float, positive_int
from ..flags import Flag

Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
MixedPrecision = Literal["no", "fp16", "bf16"]
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


class OptimisationSettings(BaseModel):
    lr: Annotated[float, Flag("--lr")] = 1e-4
    loraplus_lr_ratio: Annotated[float | None, Flag("--loraplus-lr-ratio", help="LoRA+: up/B matrices learn at lr x "
                                                                                "ratio (16 is usual)")] = Field(
        None, description="LoRA+: the up (B) matrices learn at lr x this ratio (16 is usual); unset = off")
    batch_size: Annotated[int, Flag("--batch-size")] = 1
    grad_accum: Annotated[int, Flag("--grad-accum")] = 1
    max_grad_norm: float = 1.0
    optimizer: Annotated[Optimizer, Flag("--optimizer")] = "adamw"
    weight_decay: float = 1e-2
    min_snr_gamma: Annotated[float | None, Flag("--min-snr-gamma")] = Field(
        None, description="min-SNR loss weighting gamma (5 is usual); unset = off")
    noise_offset: Annotated[float, Flag("--noise-offset")] = 0.0
    seed: Annotated[int, Flag("--seed")] = 42
    mixed_precision: Annotated[MixedPrecision, Flag("--mixed-precision")] = "no"
    gradient_checkpointing: Annotated[bool, Flag("--gradient-checkpointing", sets=True)] = False
    compile: Annotated[bool, Flag("--compile", sets=True)] = Field(
        False, description="torch.compile the UNet (CUDA; the first steps are slower while it compiles)")

    _optimisation_limits = field_validator("batch_size", "grad_accum")(at_most({"batch_size": 4096, "grad_accum": 4096}))
    _optimisation_counts = field_validator("batch_size", "grad_accum")(positive_int)
    _optimisation_amounts = field_validator("noise_offset", "weight_decay", "max_grad_norm")(non_negative_float)

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_valid(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0 or v > 1):
            raise ValueError("must be a number between 0 and 1 (typical: 1e-4)")
        return v

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _loraplus(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 1 or v > 1000):
            raise ValueError("must be between 1 and 1000 (16 is usual), or unset to turn LoRA+ off")
        return v

    @field_validator("min_snr_gamma")
    @classmethod
    def _gamma_positive(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError("must be a positive number (5 is usual), or unset to turn it off")
        return v
