"""What a run has reported so far, folded from its events: the one reducer that the CLI progress bar, the job queue
and the web UI read."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..safetext import shown
from .events import (CheckpointEvent, DoneEvent, PlanEvent, SampleEvent, StartEvent, StatusEvent, StepEvent, TrainEvent,
                     ValidationEvent, WarningEvent)


@dataclass
class JobSnapshot:
    step: int = 0
    total_steps: int = 0
    loss: float | None = None  # of the latest step
    lr: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, prompt)
    checkpoints: list[str] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    lora_path: str = ""
    plan: str = ""  # the step plan, shown before the first step
    step_times: deque = field(default_factory=lambda: deque(maxlen=20))

    def apply(self, event: TrainEvent) -> None:
        if event.total_steps:
            self.total_steps = event.total_steps
        if isinstance(event, StartEvent):
            self.step = event.step
            self.log.append(f"training {self.total_steps} steps on {event.images} images")
        elif isinstance(event, StepEvent):
            self.step = event.step
            self.losses.append((event.step, float(event.loss)))
            self.step_times.append(float(event.seconds))
            self.loss, self.lr = event.loss, event.lr
            if event.step % 10 == 0 or event.step == self.total_steps:
                self.log.append(f"step {event.step}/{self.total_steps} loss {event.loss:.4f} lr {event.lr:.2e}")
        elif isinstance(event, ValidationEvent):
            self.val_losses.append((event.step, float(event.val_loss)))
            self.log.append(f"step {event.step}: validation loss {event.val_loss:.4f}")
        elif isinstance(event, SampleEvent):
            for path, prompt in zip(event.paths, event.prompts):
                self.samples.append((event.step, path, prompt))
            self.log.append(f"step {event.step}: {len(event.paths)} preview(s)")
        elif isinstance(event, CheckpointEvent):
            self.checkpoints.append(event.path)
            self.log.append(f"step {event.step}: checkpoint saved")
        elif isinstance(event, (StatusEvent, WarningEvent)):
            if isinstance(event, PlanEvent):
                self.plan = str(event.message)
            prefix = "warning: " if isinstance(event, WarningEvent) else ""
            # File names that are not UTF-8 are shown escaped: the page's JSON cannot carry them as they are.
            self.log.extend(f"{prefix}{shown(line)}" for line in str(event.message).splitlines())
        elif isinstance(event, DoneEvent):
            self.lora_path = event.path
            self.log.append(f"finished: {self.lora_path}")

    def speed(self) -> float | None:
        """Steps per second over the recent steps."""
        if not self.step_times:
            return None
        mean = sum(self.step_times) / len(self.step_times)
        return 1.0 / mean if mean > 0 else None

    def eta_seconds(self) -> float | None:
        s = self.speed()
        return max(0.0, (self.total_steps - self.step) / s) if s else None

    def to_dict(self) -> dict[str, Any]:
        """The progress part of a job's JSON status."""
        return {"step": self.step, "total_steps": self.total_steps, "losses": list(self.losses),
                "val_losses": list(self.val_losses), "samples": list(self.samples), "checkpoints": list(self.checkpoints),
                "log": list(self.log), "lora_path": self.lora_path, "plan": self.plan}
