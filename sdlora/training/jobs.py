"""Background training jobs: a queue with one worker, so two runs never share a device.

The UI (or any caller) submits a TrainConfig and polls `snapshot()`; a job keeps running when the
browser tab closes, and a reloaded page re-attaches by reading the same state.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config.train_config import TrainConfig
from .events import TrainEvent
from ..safetext import shown

log = logging.getLogger("sdlora.training.jobs")

_ids = itertools.count(1)


@dataclass
class Job:
    config: TrainConfig
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | done | stopped | failed
    step: int = 0
    total_steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, prompt)
    checkpoints: list[str] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    error: str = ""
    lora_path: str = ""
    plan: str = ""  # the step plan, shown before the first step
    started: float | None = None
    finished: float | None = None
    step_times: deque = field(default_factory=lambda: deque(maxlen=20))
    stop_event: threading.Event = field(default_factory=threading.Event)

    def handle(self, event: TrainEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # noqa: BLE001 - a malformed event must never end a run from inside its progress callback
            log.exception("job %s: could not record a %s event", self.id, getattr(event, "kind", "?"))

    def _handle(self, event: TrainEvent) -> None:
        if event.total_steps:
            self.total_steps = event.total_steps
        if event.kind == "start":
            self.step = event.step
            self.log.append(f"training {self.total_steps} steps on {event.data.get('images')} images")
        elif event.kind == "step":
            self.step = event.step
            self.losses.append((event.step, float(event.data["loss"])))
            self.step_times.append(float(event.data["seconds"]))
            if event.step % 10 == 0 or event.step == self.total_steps:
                self.log.append(f"step {event.step}/{self.total_steps} loss {event.data['loss']:.4f} lr {event.data['lr']:.2e}")
        elif event.kind == "validation":
            self.val_losses.append((event.step, float(event.data["val_loss"])))
            self.log.append(f"step {event.step}: validation loss {event.data['val_loss']:.4f}")
        elif event.kind == "sample":
            for path, prompt in zip(event.data["paths"], event.data["prompts"]):
                self.samples.append((event.step, path, prompt))
            self.log.append(f"step {event.step}: {len(event.data['paths'])} preview(s)")
        elif event.kind == "checkpoint":
            self.checkpoints.append(event.data["path"])
            self.log.append(f"step {event.step}: checkpoint saved")
        elif event.kind in ("status", "warning"):
            if str(event.data.get("message", "")).startswith("Step plan:"):
                self.plan = str(event.data["message"])
            prefix = "warning: " if event.kind == "warning" else ""
            # File names that are not UTF-8 are shown escaped: the page's JSON cannot carry them as they are.
            self.log.extend(f"{prefix}{shown(line)}" for line in str(event.data.get("message", "")).splitlines())
        elif event.kind == "done":
            self.lora_path = event.data.get("path", "")
            self.log.append(f"finished: {self.lora_path}")

    def speed(self) -> float | None:
        """Steps per second over the recent steps."""
        if not self.step_times:
            return None
        mean = sum(self.step_times) / len(self.step_times)
        return 1.0 / mean if mean > 0 else None

    def eta_seconds(self) -> float | None:
        s = self.speed()
        if not s or self.state != "running":
            return None
        return max(0.0, (self.total_steps - self.step) / s)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "step": self.step, "total_steps": self.total_steps,
            "losses": list(self.losses), "val_losses": list(self.val_losses), "samples": list(self.samples), "checkpoints": list(self.checkpoints),
            "log": list(self.log), "error": self.error, "lora_path": self.lora_path,
            "it_per_s": self.speed(), "eta_s": self.eta_seconds(), "output_dir": self.config.output_dir,
            "output_name": self.config.output_name, "base_model": self.config.base_model, "plan": self.plan,
        }


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style), for the loss plot."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        if not math.isfinite(v):
            out.append(out[-1] if out else v)
            continue
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _job_error(job: Job, exc: BaseException) -> str:
    """The job's error boundary: one sentence naming the run's output folder; a traceback goes to a log file
    (OUTPUT/logs, else the sdlora cache's logs/) that the sentence names, never to the page."""
    try:
        from ..errorlog import describe

        return describe(exc, context=f"Training into '{job.config.output_dir}'", out_dir=job.config.output_path())
    except Exception:  # noqa: BLE001 - even describing the error must not kill the worker
        log.exception("job %s failed", job.id)
        return f"Training into '{shown(job.config.output_dir)}' failed: {type(exc).__name__}."


class JobQueue:
    """One worker thread runs jobs in order. `submit` never blocks; `stop` asks the running job to checkpoint and stop."""

    def __init__(self):
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="sdlora-train", daemon=True)
        self._worker.start()

    def submit(self, config: TrainConfig) -> Job:
        job = Job(config=config)
        with self._lock:
            self._jobs.append(job)
        self._queue.put(job)
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int) -> Job | None:
        return next((j for j in self.jobs() if j.id == job_id), None)

    def current(self) -> Job | None:
        """The running job, else the newest one (what a reloaded page should show)."""
        jobs = self.jobs()
        running = [j for j in jobs if j.state == "running"]
        return running[0] if running else (jobs[-1] if jobs else None)

    def stop(self, job_id: int | None = None) -> bool:
        job = self.get(job_id) if job_id else self.current()
        if job is None or job.state not in ("queued", "running"):
            return False
        job.stop_event.set()
        if job.state == "queued":
            job.state = "stopped"
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.state != "queued":
                continue
            job.state = "running"
            job.started = time.time()
            try:
                from .trainer import train

                result = train(job.config, on_event=job.handle, stop_event=job.stop_event)
                job.state = "stopped" if getattr(result, "stopped_early", False) else "done"
            except Exception as exc:  # the worker must survive any job
                job.state = "failed"
                job.error = _job_error(job, exc)
                job.log.append(f"error: {job.error}")
            finally:
                job.finished = time.time()
