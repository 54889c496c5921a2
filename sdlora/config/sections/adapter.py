"""The adapter a run trains: type, rank and alpha, which layers, its dropouts, and whether the text encoder gets one.
Which combinations cannot work is decided in sdlora.adapters.rules (TrainConfig asks it)."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from ...adapters.rules import Network
from ...adapters.targets import KNOWN_UNET_TARGETS, OTHER_UNET_LEAVES, UNET_SHORTHANDS
from ..checks import at_most, dropout_rate, non_negative_int
from ..errors import ConfigError
from ..flags import Flag, learning_rates

TARGET_SHORTHANDS = tuple(UNET_SHORTHANDS)


class AdapterSettings(BaseModel):
    rank: Annotated[int, Flag("--rank")] = Field(16, description="LoRA rank (dim)")
    alpha: Annotated[float, Flag("--alpha")] = Field(16.0, description="LoRA alpha; the update is scaled by alpha/rank")
    targets: Annotated[list[str], Flag("--targets", help="comma-separated: attn, attn1, attn2, transformer or module "
                                                         "names (to_q,proj_in,...)")] = Field(
        default_factory=lambda: ["attn"], description="UNet modules or shorthands attn, attn1, attn2, transformer")
    conv_rank: Annotated[int, Flag("--conv-rank")] = Field(0, description="rank for LoRA on ResNet 3x3 convs (0 = off)")
    conv_alpha: Annotated[float, Flag("--conv-alpha")] = Field(1.0, description="alpha for the conv LoRA")
    network: Annotated[Network, Flag("--network", help="adapter type (locon = LoRA on the ResNet blocks too, needs "
                                                       "--conv-rank)")] = Field(
        "lora", description="adapter type: lora, locon (LoRA on the ResNet blocks too; needs conv_rank), loha "
                            "(Hadamard product), lokr (Kronecker product)")
    dora: Annotated[bool, Flag("--dora", sets=True)] = Field(
        False, description="DoRA: weight-decomposed adapter (a learned magnitude per input column)")
    lokr_factor: Annotated[int, Flag("--lokr-factor", help="LoKr factor (-1 = balanced)")] = Field(
        -1, description="LoKr: factor of the Kronecker split (-1 = as balanced as possible)")
    lokr_full_matrix: Annotated[bool, Flag("--lokr-full-matrix", sets=True)] = Field(
        False, description="LoKr: keep the second factor a full matrix (no rank limit)")
    tucker: Annotated[bool, Flag("--tucker", sets=True)] = Field(
        False, description="conv 3x3 layers with a Tucker core (LyCORIS use_tucker)")
    dropout: Annotated[float, Flag("--dropout", help="dropout inside the adapter")] = Field(
        0.0, description="dropout inside the adapter (0 = off)")
    rank_dropout: Annotated[float, Flag("--rank-dropout")] = Field(
        0.0, description="drop this fraction of the rank at each step (kohya/LyCORIS rank_dropout)")
    module_dropout: Annotated[float, Flag("--module-dropout")] = Field(
        0.0, description="skip an adapted module at a step with this probability")
    train_text_encoder: Annotated[bool, Flag("--train-text-encoder", sets=True)] = False
    text_encoder_lr: Annotated[float | list[float] | None, Flag(
        "--text-encoder-lr", parse=learning_rates, metavar="LR[,LR2]",
        help="text-encoder LR; SDXL: one for both encoders or TE1,TE2 (0 = frozen)")] = Field(
        None, description="text encoder learning rate (default: same as lr); for SDXL one value for both encoders or "
                          "[te1, te2] (0 keeps that encoder frozen), as kohya's text_encoder_lr")

    _adapter_limits = field_validator("rank", "conv_rank")(at_most({"rank": 4096, "conv_rank": 4096}))
    _adapter_counts = field_validator("conv_rank")(non_negative_int)
    _adapter_dropouts = field_validator("dropout", "rank_dropout", "module_dropout")(dropout_rate)

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 (typical: 4-128)")
        return v

    @field_validator("alpha", "conv_alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError("must be a positive number (commonly equal to the rank, or 1)")
        return v

    @field_validator("lokr_factor")
    @classmethod
    def _lokr_factor(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("use -1 (as balanced as possible) or a positive factor such as 4 or 8")
        return v

    @field_validator("targets")
    @classmethod
    def _targets_known_shape(cls, v: list[str]) -> list[str]:
        cleaned = [t.strip() for t in v if t and t.strip()]
        if not cleaned:
            raise ValueError(f"choose at least one target ({', '.join(TARGET_SHORTHANDS)} or module names like to_q)")
        for t in cleaned:
            if not re.fullmatch(r"[A-Za-z0-9_.]+", t):
                raise ValueError(f"'{t}' is not a module name; use {', '.join(TARGET_SHORTHANDS)} or names like to_q, ff.net.2")
            if t not in TARGET_SHORTHANDS and not any(t == k or t.endswith("." + k) for k in KNOWN_UNET_TARGETS + OTHER_UNET_LEAVES):
                raise ValueError(f"unknown target module '{t}'; use {', '.join(TARGET_SHORTHANDS)} or any of {', '.join(KNOWN_UNET_TARGETS)}")
        return cleaned

    @field_validator("text_encoder_lr")
    @classmethod
    def _te_lr_valid(cls, v):
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not 1 <= len(v) <= 2:
            raise ValueError("give one learning rate, or two for SDXL's two text encoders, e.g. [5e-5, 1e-5]")
        for x in values:
            if not math.isfinite(x) or x < 0 or x > 1:
                raise ValueError("must be between 0 and 1 (typical: 5e-5; 0 keeps that text encoder frozen)")
        if values and not any(values):
            raise ValueError("is 0 for every text encoder: turn off train_text_encoder instead")
        return v

    @model_validator(mode="after")
    def _text_encoder_rules(self):
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_lr is set but train_text_encoder is off: turn on train_text_encoder or remove text_encoder_lr")
        return self

    def text_encoder_lrs(self, count: int) -> list[float]:
        """One learning rate per text encoder of the model (SD1/SD2: 1, SDXL: 2); unset = the UNet's `lr`."""
        v = self.text_encoder_lr
        if v is None:
            return [self.lr] * count
        values = list(v) if isinstance(v, list) else [v]
        if len(values) not in (1, count):
            raise ConfigError(f"text_encoder_lr: {len(values)} values given, but this model has {count} text encoder"
                              f"{'s' if count > 1 else ''}. Give one value{' or ' + str(count) if count > 1 else ''}.")
        return values * count if len(values) == 1 else values
