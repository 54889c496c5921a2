"""OUTPUT/train_log.jsonl (one JSON line per step and per validation) and, with log_with = tensorboard, accelerate's
tracker (loss, lr and val_loss under OUTPUT/logs/tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

LOG_NAME = "train_log.jsonl"


class TrainLog:
    def __init__(self, out_dir: Path, accelerator, *, tracking: bool, warn: Callable[[int, str], None]):
        self.path = Path(out_dir) / LOG_NAME
        self.accelerator = accelerator
        self.tracking = tracking
        self.warn = warn  # (step, message): how a failed write is reported, once
        self.failed = False

    def start(self, start_step: int) -> None:
        """A run from step 0 starts a fresh log; a resumed one appends."""
        if self.accelerator.is_main_process and start_step == 0 and self.path.exists():
            self.path.unlink()

    def step(self, step: int, loss: float, lr: float, seconds: float, data_seconds: float, epoch: int,
             extra: dict | None = None) -> None:
        """`extra`: more values of this step (scale_weight_norms' keys_scaled and key norms), logged and tracked."""
        self.write(step, {"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 5),
                          "data_seconds": round(data_seconds, 5), "epoch": epoch, **(extra or {})})
        self.track({"loss": loss, "lr": lr, **(extra or {})}, step)

    def validation(self, step: int, value: float) -> None:
        self.write(step, {"step": step, "val_loss": value})
        self.track({"val_loss": value}, step)

    def track(self, values: dict, step: int) -> None:
        if self.tracking:
            self.accelerator.log(values, step=step)

    def write(self, step: int, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not end the run over a log line
            if not self.failed:
                self.failed = True
                self.warn(step, f"Cannot write {self.path} ({exc.strerror or exc}); training continues without the step log.")
