"""Caption edits from the web UI: one image's caption, or find/replace/prepend/append over a whole dataset. Writes
stay inside the (checked) dataset folder."""

from __future__ import annotations

from pathlib import Path

from ...config.train_config import ConfigError
from ..access import is_inside
from .datasets import DatasetService


class CaptionService:
    def __init__(self, datasets: DatasetService):
        self.datasets = datasets

    def caption_file(self, folder: str, image_path: str, caption_path: str | None = None) -> tuple[Path, Path]:
        """(dataset root, caption file) for an existing image inside a dataset root; anything else is refused."""
        from ...data.captions import CAPTION_EXTENSIONS, caption_path_for

        root = self.datasets.root(folder)
        image = self.datasets.access.caption_image(root, image_path)
        target = Path(caption_path) if caption_path else caption_path_for(image)
        if target.suffix.lower() not in CAPTION_EXTENSIONS:
            target = caption_path_for(image)  # e.g. the caption came from metadata.jsonl: a .txt takes precedence
        if not is_inside(target, root):
            raise ConfigError(f"Refusing to write caption '{target}': it is outside the dataset folder '{root}'.")
        return root, target

    def save(self, folder: str, image_path: str, text: str, caption_path: str | None = None) -> Path:
        from ...data.captions import write_caption

        root, target = self.caption_file(folder, image_path, caption_path)
        try:
            return write_caption(target, text or "", root=root)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def bulk_edit(self, folder: str, *, find: str, replace: str, prepend: str, append: str) -> int:
        from ...data.captions import bulk_edit_captions

        if not (find or prepend.strip() or append.strip()):
            raise ConfigError("Bulk edit: fill in Find (with Replace), Prepend or Append first.")
        report = self.datasets.scan(folder)
        try:
            return bulk_edit_captions(report.items, find=find, replace=replace, prepend=prepend, append=append, root=report.root)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
