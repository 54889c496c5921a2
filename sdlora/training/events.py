"""Progress events the training loop emits, one class per kind; the CLI prints them, the UI plots them.

Every event carries the optimizer step it belongs to and the run's length. `kind` and `data` (the kind's own
fields) give the JSON form that `to_dict()` returns: {"kind", "step", "total_steps", "data"}.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

_COMMON = ("step", "total_steps")


@dataclass(frozen=True, kw_only=True)
class TrainEvent:
    kind: ClassVar[str] = ""
    step: int = 0
    total_steps: int = 0

    @property
    def data(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _COMMON}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "total_steps": self.total_steps, "data": self.data}

    def console_line(self) -> str | None:
        """The line a console prints for this event; None for what a progress bar shows instead."""
        return None


@dataclass(frozen=True, kw_only=True)
class StatusEvent(TrainEvent):
    kind: ClassVar[str] = "status"
    message: str

    def console_line(self) -> str:
        return self.message


@dataclass(frozen=True, kw_only=True)
class PlanEvent(StatusEvent):
    """The step plan (epochs, batches, repeats), sent once before the first step; `message` describes it."""
    plan: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class WarningEvent(TrainEvent):
    kind: ClassVar[str] = "warning"
    message: str

    def console_line(self) -> str:
        return "warning: " + self.message


@dataclass(frozen=True, kw_only=True)
class StartEvent(TrainEvent):
    kind: ClassVar[str] = "start"
    total: int
    images: int
    samples: int


@dataclass(frozen=True, kw_only=True)
class StepEvent(TrainEvent):
    kind: ClassVar[str] = "step"
    loss: float
    lr: float
    seconds: float
    data_seconds: float = 0.0  # how long the step waited for its batch
    epoch: int = 0


@dataclass(frozen=True, kw_only=True)
class ValidationEvent(TrainEvent):
    kind: ClassVar[str] = "validation"
    val_loss: float

    def console_line(self) -> str:
        return f"step {self.step}: validation loss {self.val_loss:.4f}"


@dataclass(frozen=True, kw_only=True)
class SampleEvent(TrainEvent):
    kind: ClassVar[str] = "sample"
    paths: list[str]
    prompts: list[str]

    def console_line(self) -> str:
        return f"step {self.step}: samples " + ", ".join(self.paths)


@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(TrainEvent):
    kind: ClassVar[str] = "checkpoint"
    path: str

    def console_line(self) -> str:
        return f"step {self.step}: checkpoint {self.path}"


@dataclass(frozen=True, kw_only=True)
class DoneEvent(TrainEvent):
    kind: ClassVar[str] = "done"
    path: str
    stopped: bool
    loss: float | None
