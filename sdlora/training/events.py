"""Progress events the training loop emits; the CLI prints them, the UI plots them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainEvent:
    # kinds: status, warning, start, step, validation, sample, checkpoint, done
    kind: str
    step: int = 0
    total_steps: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
