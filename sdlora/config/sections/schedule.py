"""How long a run is and how its learning rate moves over it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..checks import at_most, non_negative_int, positive_or_none
from ..flags import Flag

Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
DEFAULT_STEPS = 500  # when neither steps nor epochs is given


class ScheduleSettings(BaseModel):
    steps: Annotated[int | None, Flag("--steps")] = Field(None, description="optimizer steps; if unset, --epochs decides")
    epochs: Annotated[int | None, Flag("--epochs")] = None
    # The command line takes any text here: the config's check names the schedulers.
    lr_scheduler: Annotated[Scheduler, Flag("--lr-scheduler", offer_choices=False)] = "constant"
    warmup_steps: Annotated[int, Flag("--warmup-steps")] = 0

    _schedule_limits = field_validator("steps", "epochs", "warmup_steps")(
        at_most({"steps": 10_000_000, "epochs": 1_000_000, "warmup_steps": 10_000_000}))
    _schedule_lengths = field_validator("steps", "epochs")(positive_or_none)
    _schedule_counts = field_validator("warmup_steps")(non_negative_int)

    @model_validator(mode="after")
    def _schedule_rules(self):
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        if self.warmup_steps and self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self
