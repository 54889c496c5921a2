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
from .progress import JobSnapshot
from ..safetext import shown

log = logging.getLogger("sdlora.training.jobs")

_ids = itertools.count(1)


@dataclass
class Job:
    config: TrainConfig
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | done | stopped | failed
    progress: JobSnapshot = field(default_factory=JobSnapshot)
    error: str = ""
    started: float | None = None
    finished: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def handle(self, event: TrainEvent) -> None:
        try:
            self.progress.apply(event)
        except Exception:  # noqa: BLE001 - a malformed event must never end a run from inside its progress callback
            log.exception("job %s: could not record a %s event", self.id, getattr(event, "kind", "?"))

    # What the queue listing and callers read; the snapshot holds it.
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def total_steps(self) -> int:
        return self.progress.total_steps

    @property
    def checkpoints(self) -> list[str]:
        return self.progress.checkpoints

    @property
    def lora_path(self) -> str:
        return self.progress.lora_path

    @property
    def log(self) -> deque:
        return self.progress.log

    def speed(self) -> float | None:
        """Steps per second over the recent steps."""
        return self.progress.speed()

    def eta_seconds(self) -> float | None:
        return self.progress.eta_seconds() if self.state == "running" else None

    def snapshot(self) -> dict[str, Any]:
        p = self.progress.to_dict()
        return {
            "id": self.id, "state": self.state, "step": p["step"], "total_steps": p["total_steps"],
            "losses": p["losses"], "val_losses": p["val_losses"], "samples": p["samples"], "checkpoints": p["checkpoints"],
            "log": p["log"], "error": self.error, "lora_path": p["lora_path"],
            "it_per_s": self.speed(), "eta_s": self.eta_seconds(), "output_dir": self.config.output_dir,
            "output_name": self.config.output_name, "base_model": self.config.base_model, "plan": p["plan"],
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
