"""Automatic captions from the web UI: one background run at a time (its own thread with a stop event; the training
queue is for training), polled by the page. Datasets must lie under the data roots and model folders under
--model-root, as everywhere else on this server."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config.train_config import ConfigError
from ..access import AccessPolicy
from .datasets import DatasetService

log = logging.getLogger("sdlora.ui.autocaption")
LOG_LINES = 200
CHANGES_SHOWN = 200  # a dry run's changes kept for the page
BAR_WIDTH = 24


@dataclass
class CaptionJob:
    id: int
    root: Path
    options: Any  # CaptionOptions
    state: str = "running"  # running | done | stopped | failed
    done: int = 0
    to_caption: int = 0
    images: int = 0
    device: str = ""
    error: str = ""
    summary: Any = None  # CaptionSummary once done
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    changes: list = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def handle(self, event) -> None:
        from ...captioning.run import CaptionDone, CaptionImage, CaptionStart, CaptionWarning

        if isinstance(event, CaptionStart):
            self.to_caption, self.images, self.device = event.to_caption, event.total, event.device
            self.log.append(f"{event.to_caption} of {event.total} images to caption with {event.model} on {event.device or '–'}")
        elif isinstance(event, CaptionWarning):
            self.log.append(f"warning: {event.message}")
        elif isinstance(event, CaptionImage):
            self.log.append(f"{event.caption_file}: {event.action}" + (f" → {event.new}" if event.new != event.old else ""))
            if event.action.startswith("would") and len(self.changes) < CHANGES_SHOWN:
                self.changes.append([event.caption_file, event.old, event.new])
        elif isinstance(event, CaptionDone):
            self.summary = event.summary
        if getattr(event, "done", None) is not None:
            self.done = event.done


def values_to_options(values: dict[str, Any], model_dirs=()):
    """The panel's values as CaptionOptions (each checked, the message naming the setting)."""
    from ...captioning import CaptionOptions, TagOptions, TextOptions

    def num(key, default):
        value = values.get(key)
        return default if value is None or value == "" else value

    tags = TagOptions(threshold=num("threshold", 0.35), character_threshold=num("character_threshold", 0.85),
                      include_ratings=bool(values.get("include_ratings")), undesired=values.get("undesired_tags") or "",
                      replacements=values.get("tag_replacement") or "",
                      underscores_to_spaces=not values.get("keep_underscores"), max_tags=num("max_tags", 0))
    text = TextOptions(max_length=num("max_length", 40), num_beams=num("num_beams", 3), sample=bool(values.get("sample")),
                       prefix=values.get("prefix") or "", suffix=values.get("suffix") or "")
    return CaptionOptions(kind=values.get("kind") or "wd14", model=values.get("model") or "", mode=values.get("mode") or "skip",
                          extension=values.get("extension") or ".txt", batch_size=num("batch_size", 8),
                          dry_run=bool(values.get("dry_run")), trigger_word=values.get("trigger_word") or "",
                          device=values.get("device") or "auto", model_dirs=list(model_dirs), tags=tags, text=text)


class AutoCaptionService:
    def __init__(self, access: AccessPolicy, datasets: DatasetService):
        self.access = access
        self.datasets = datasets
        self._lock = threading.Lock()
        self._job: CaptionJob | None = None
        self._ids = 0

    @property
    def job(self) -> CaptionJob | None:
        return self._job

    def running(self) -> bool:
        return self._job is not None and self._job.state == "running"

    def start(self, values: dict[str, Any]) -> CaptionJob:
        """Check everything a client sent (dataset under a data root, model under a model root, each option, the model's
        files), then caption in the background. One run at a time."""
        from ...captioning.run import load_model

        if self.running():
            raise ConfigError("A captioning run is going on: wait for it or press Stop first.")
        root = self.datasets.root(values.get("data_dir") or "")
        model_spec = (values.get("model") or "").strip()
        self.access.caption_model(model_spec, what="Model folder")
        options = values_to_options(values, model_dirs=self.access.model_roots)
        model = load_model(options)  # the files checked now, so a wrong folder is a pop-up, not a failed job
        from ...captioning.locate import in_hub_cache

        if not in_hub_cache(model.folder):  # a hub id found as MODEL_ROOT/OWNER_NAME: that folder (or link) counts
            self.access.caption_model(str(model.folder), what="Model folder")
        with self._lock:
            if self.running():
                raise ConfigError("A captioning run is going on: wait for it or press Stop first.")
            self._ids += 1
            job = CaptionJob(id=self._ids, root=root, options=options)
            self._job = job
        threading.Thread(target=self._work, args=(job, model), name=f"sdlora-caption-{job.id}", daemon=True).start()
        return job

    def _work(self, job: CaptionJob, model) -> None:
        from ...captioning.run import caption_dataset

        try:
            for event in caption_dataset(job.root, job.options, stop_event=job.stop_event, model=model):
                job.handle(event)
            job.state = "stopped" if job.summary is not None and job.summary.stopped else "done"
        except Exception as exc:  # noqa: BLE001 - the thread's error boundary: one sentence, the traceback in a log
            from ...errorlog import describe

            try:
                job.error = describe(exc, context=f"Captioning '{job.root}'")
            except Exception:  # noqa: BLE001 - even describing must not leave the job 'running'
                log.exception("captioning failed")
                job.error = f"Captioning '{job.root}' failed: {type(exc).__name__}."
            job.log.append(f"error: {job.error}")
            job.state = "failed"
        finally:
            job.finished = time.time()

    def stop(self) -> bool:
        """Ask the running captioning to end after its current batch. False if none is running."""
        job = self._job
        if job is None or job.state != "running":
            return False
        job.stop_event.set()
        return True

    def wait(self, timeout: float | None = None) -> CaptionJob | None:
        """The job once it is no longer running (or at the timeout); for scripts and tests."""
        deadline = None if timeout is None else time.time() + timeout
        while self.running() and (deadline is None or time.time() < deadline):
            time.sleep(0.05)
        return self._job

    def undo(self, folder: str) -> str:
        """Undo the last captioning run in a dataset folder; returns the sentence saying what was put back."""
        from ...captioning.writer import undo_last_run

        root = self.datasets.root(folder)
        if self.running() and self._job.root == root:
            raise ConfigError("A captioning run is writing to this folder: stop it first, then undo.")
        return undo_last_run(root).summary()

    def status(self) -> dict[str, Any]:
        job = self._job
        if job is None:
            return {"id": None, "state": "idle", "done": 0, "total": 0, "images": 0, "device": "", "log": [], "error": "",
                    "summary": [], "tags": [], "changes": [], "folder": ""}
        summary = job.summary
        return {"id": job.id, "state": job.state, "done": job.done, "total": job.to_caption, "images": job.images,
                "device": job.device, "log": list(job.log), "error": job.error,
                "summary": summary.lines() if summary else [], "folder": str(job.root),
                "tags": [[t, n] for t, n in summary.top_tags(50)] if summary else [], "changes": list(job.changes)}


def progress_text(status: dict[str, Any]) -> str:
    """One line for the panel: a text progress bar, counts, and the summary or error when the run has ended."""
    if status["state"] == "idle":
        return "No captioning run yet."
    total, done = status["total"], status["done"]
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    bar = "█" * filled + "░" * (BAR_WIDTH - filled)
    text = f"**Captioning {status['state']}** `{bar}` {done}/{total} images"
    if status["device"]:
        text += f" · {status['device']}"
    if status["summary"]:
        text += "\n\n" + "\n\n".join(status["summary"])
    if status["error"]:
        from ..wording import for_the_ui

        text += f"\n\n**Error:** {for_the_ui(status['error'])}"
    return text
