"""The exception types whose messages are written for the user (CLI prints them, UI shows them)."""

from __future__ import annotations


def _collect() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data.captions import CaptionWriteError
    from .data.images import ImageLoadError
    from .data.scan import DatasetError
    from .export import ExportError
    from .inference import LoraLoadError
    from .models import ModelLoadError
    from .outputs import OutputError
    from .resume import CheckpointError
    from .train import TrainingError
    from .verify import LoraMismatchError

    return (ConfigError, DatasetError, ImageLoadError, ModelLoadError, TrainingError, ExportError, LoraLoadError,
            LoraMismatchError, OutputError, CheckpointError, CaptionWriteError, FileNotFoundError, PermissionError)


USER_ERRORS = _collect()
