"""Images held out to measure a validation loss, and how often it is measured."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from ..checks import at_most, non_negative_int
from ..flags import Flag


class ValidationSettings(BaseModel):
    validation_split: Annotated[float, Flag("--validation-split", help="fraction of the images held out for "
                                                                       "validation loss")] = Field(
        0.0, description="fraction of the training images held out for validation loss (chosen from the seed; 0 = none)")
    validation_dir: Annotated[str, Flag("--validation-dir", help="separate folder of validation images (replaces "
                                                                 "--validation-split)")] = Field(
        "", description="folder of validation images with captions (scanned like data_dir); replaces validation_split")
    validate_every: Annotated[int, Flag("--validate-every", help="validation loss every N steps (0 = only at the "
                                                                 "end)")] = Field(
        0, description="validation loss every N steps (0 = only at the end, when validation images are given)")

    _validation_limits = field_validator("validate_every")(at_most({"validate_every": 10_000_000}))
    _validation_counts = field_validator("validate_every")(non_negative_int)

    @field_validator("validation_split")
    @classmethod
    def _split_fraction(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 <= v < 1:
            raise ValueError("must be at least 0 and below 1 (a fraction of the training images; 0.1 is usual)")
        return v

    @model_validator(mode="after")
    def _validation_rules(self):
        if self.validation_split and self.validation_dir:
            raise ValueError("validation_split and validation_dir are both set: hold out part of the training images "
                             "(validation_split) or give a separate folder (validation_dir), not both")
        if self.validate_every and not (self.validation_split or self.validation_dir):
            raise ValueError("validate_every is set but there are no validation images: set validation_split (e.g. 0.1) "
                             "or validation_dir")
        return self
