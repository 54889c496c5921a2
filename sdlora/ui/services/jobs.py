"""Training jobs from the web UI: one queue per server process, so training outlives a closed tab and a reloaded
page finds its job again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config.train_config import ConfigError
from ...training.jobs import JobQueue
from .configs import ConfigService


def idle_snapshot() -> dict[str, Any]:
    """What status reports before the first job: the same keys as a job's snapshot."""
    return {"id": None, "state": "idle", "step": 0, "total_steps": 0, "losses": [], "samples": [], "checkpoints": [],
            "val_losses": [], "log": [], "error": "", "lora_path": "", "it_per_s": None, "eta_s": None, "output_dir": "",
            "output_name": "", "base_model": ""}


class JobService:
    def __init__(self, configs: ConfigService, queue: JobQueue | None = None):
        self.configs = configs
        self.queue = queue or JobQueue()

    def start(self, values: dict[str, Any]):
        return self.queue.submit(self.configs.checked(values))

    def resume(self, values: dict[str, Any]):
        """Queue the same settings with resume='latest': the run continues from the newest checkpoint of its output."""
        from ...training.checkpoints import CHECKPOINT_DIR, find_latest_checkpoint

        cfg = self.configs.checked(dict(values, resume="latest"))
        pending = any(j.config.output_dir == cfg.output_dir and j.state in ("queued", "running") for j in self.queue.jobs())
        if not pending and find_latest_checkpoint(Path(cfg.output_dir)) is None:
            raise ConfigError(f"Nothing to resume: '{cfg.output_name}' has no checkpoint in {cfg.output_dir}/{CHECKPOINT_DIR}. "
                              "Press Start training (set 'Checkpoint every N steps' to be able to resume later).")
        return self.queue.submit(cfg)

    def stop(self) -> bool:
        return self.queue.stop()

    def status(self) -> dict[str, Any]:
        """The running (else the newest) job's snapshot, or an idle one, plus a summary of the whole queue."""
        job = self.queue.current()
        snap = job.snapshot() if job else idle_snapshot()
        snap["queue"] = [{"id": j.id, "state": j.state, "output_name": j.config.output_name, "step": j.step,
                          "total_steps": j.total_steps, "resume": bool(j.config.resume)} for j in self.queue.jobs()]
        return snap
