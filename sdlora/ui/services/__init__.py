"""What the web UI can do, as plain Python over the library (no Gradio here): tabs and API endpoints call these.

One `Services` per server process. It builds the server's one `AccessPolicy` (access.py: which folders a client may
read and write; every service checks a client's path there first) and one `ModelCache`, and hands them to small
services, one per job the page does:

    datasets  scan, gallery thumbnails        captions  caption edits
    configs   form values -> checked config   presets   list, load, save
    jobs      the training queue              loras     LoRA files to pick
    tryout    Try tab images and grids        exporter  export and verify
    tools     resize, combine, merge, extract models    the shared base-model cache and its lock
    autocaption  automatic captions (taggers, caption models) in the background, stop and undo
"""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ...training.jobs import JobQueue
from ..access import AccessPolicy, too_broad
from .autocaption import AutoCaptionService
from .captions import CaptionService
from .configs import ConfigService
from .datasets import DatasetService
from .exporter import Exporter
from .jobs import JobService
from .lora_files import LoraFiles
from .model_cache import ModelCache
from .presets import PresetService
from .tools import ToolsService
from .tryout import TryOut

__all__ = ["Services"]


class Services:
    """The web UI's services over one output root. data_roots / model_roots / pickle_from_clients are what clients
    may use beyond it (app.py --data-root, --model-root, --allow-pickle-from-clients)."""

    def __init__(self, output_root: Path, presets_dir: Path, *, data_roots=(), model_roots=(),
                 pickle_from_clients: bool = False, queue: JobQueue | None = None):
        self.output_root = Path(output_root).expanduser().resolve()
        if too_broad(self.output_root):
            raise ConfigError(f"Output root '{self.output_root}' is the filesystem root or a home folder (or above one): "
                              "the server writes and serves files there. Choose a folder of its own, e.g. --output-root outputs.")
        self.output_root.mkdir(parents=True, exist_ok=True)
        self.presets_dir = Path(presets_dir).expanduser().resolve()
        self.access = AccessPolicy(self.output_root, self.presets_dir, list(data_roots), list(model_roots),
                                   pickle_from_clients)
        self.models = ModelCache(self.access)
        self.datasets = DatasetService(self.access)
        self.captions = CaptionService(self.datasets)
        self.autocaption = AutoCaptionService(self.access, self.datasets)
        self.configs = ConfigService(self.access, self.datasets, self.models)
        self.presets = PresetService(self.presets_dir, self.configs)
        self.jobs = JobService(self.configs, queue)
        self.loras = LoraFiles(self.access)
        self.tryout = TryOut(self.models, self.loras)
        self.exporter = Exporter(self.access, self.models)
        self.tools = ToolsService(self.access, self.models)

    def allowed_paths(self) -> list[str]:
        """For Gradio's launch(allowed_paths=...): the output root only. Within it the request guard (http_guard.py)
        lets through only the files AccessPolicy.may_serve names; dataset folders are never served."""
        return [str(self.output_root)]
