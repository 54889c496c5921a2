"""One captioning run over a dataset folder, as a generator of typed events: the CLI draws a progress bar from them,
the web UI's job folds them into its status. The model is loaded only when some image needs a caption, and freed
at the end (also after a stop or an error) so training gets the memory back."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..data.captions import split_tags
from ..safetext import shown
from .images import open_for_captioning
from .locate import model_folder
from .options import EXTENSIONS, CaptionOptions, CaptioningError
from .writer import CaptionWriter, compose


@dataclass
class CaptionStart:
    total: int  # images in the dataset
    to_caption: int  # images the run will caption (the others keep theirs: mode skip)
    model: str
    device: str


@dataclass
class CaptionImage:
    done: int  # images handled so far, of CaptionStart.to_caption
    image: str  # relative to the dataset folder
    caption_file: str
    action: str  # created | replaced | unchanged | empty (nothing found) | failed | would create | would replace
    old: str
    new: str
    message: str = ""  # why it failed


@dataclass
class CaptionWarning:
    message: str
    done: int | None = None  # set when the warning is about an image (it counts as handled)


@dataclass
class CaptionSummary:
    root: str
    model: str = ""
    device: str = ""
    total: int = 0
    skipped: int = 0  # already captioned (mode skip)
    created: int = 0
    replaced: int = 0
    unchanged: int = 0
    empty: int = 0
    failed: int = 0  # unreadable images and captions that could not be written
    dry_run: bool = False
    stopped: bool = False
    tags: Counter = field(default_factory=Counter)  # tags of the captions this run wrote (or would write)
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # dry run: (caption file, old, new)

    @property
    def tagged(self) -> int:
        return self.created + self.replaced

    def top_tags(self, n: int = 20) -> list[tuple[str, int]]:
        return self.tags.most_common(n)

    def lines(self, top: int = 20) -> list[str]:
        verb = "would caption" if self.dry_run else "captioned"
        head = (f"{'Stopped: ' if self.stopped else ''}{verb} {self.tagged} of {self.total} images in {self.root} "
                f"({self.created} new caption files, {self.replaced} replaced), {self.skipped} skipped (already "
                f"captioned), {self.unchanged} unchanged, {self.empty} with nothing found, {self.failed} failed "
                f"[{self.model} on {self.device or 'no device'}]")
        out = [head]
        if self.tags:
            out.append("top tags: " + ", ".join(f"{t} ({n})" for t, n in self.top_tags(top)))
        if self.dry_run:
            out.append("dry run: no file was written")
        return [shown(line) for line in out]


@dataclass
class CaptionDone:
    summary: CaptionSummary


CaptionEvent = CaptionStart | CaptionImage | CaptionWarning | CaptionDone


def load_model(options: CaptionOptions):
    """The tagger or caption model the options name, its files checked (not yet loaded: call .load())."""
    folder, model_file = model_folder(options.model, options.kind, options.model_dirs)
    if options.kind == "wd14":
        from .wd14 import WD14Tagger

        return WD14Tagger(folder, options.tags, model_file=model_file, device=options.device)
    from .vision_captioner import VisionCaptioner

    return VisionCaptioner(folder, options.text, device=options.device)


def _scan(root: Path, extension: str, warnings: list[str]):
    from ..data.scan import scan_dataset

    # The chosen extension is read first, so "skip" and "append" see the caption this run would replace.
    order = (extension, *[e for e in EXTENSIONS if e != extension])
    report = scan_dataset(root, caption_extensions=order, check_images=False)
    warnings += [f"skipped {report._rel(s.path)}: {s.reason}" for s in report.skipped]
    return report


def _rel(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else str(path)


def caption_dataset(root, options: CaptionOptions, *, stop_event: threading.Event | None = None,
                    model=None) -> Iterator[CaptionEvent]:
    """Caption the images of `root`; yields CaptionStart, a CaptionImage per image handled, CaptionWarnings and last
    CaptionDone. A set stop_event ends the run after the current batch. `model`: an already made one (tests, reuse)."""
    from ..data.scan import check_dataset_root

    root = check_dataset_root(Path(root).expanduser())
    model = model or load_model(options)  # checks the model's files before the scan
    warnings: list[str] = []
    report = _scan(root, options.extension, warnings)
    for w in warnings:
        yield CaptionWarning(w)
    summary = CaptionSummary(root=str(root), model=options.model, total=report.num_images, dry_run=options.dry_run)
    todo = []
    for item in report.items:
        if options.mode == "skip" and item.caption_source != "default":
            summary.skipped += 1
        else:
            todo.append(item)
    writer = CaptionWriter(root, description=f"{options.kind} {options.model}, mode {options.mode}")
    done = 0
    try:
        if todo:
            model.load()
        summary.device = getattr(model, "device", "")
        yield CaptionStart(total=report.num_images, to_caption=len(todo), model=options.model, device=summary.device)
        for start in range(0, len(todo), options.batch_size):
            if stop_event is not None and stop_event.is_set():
                summary.stopped = True
                break
            batch, images = [], []
            for item in todo[start:start + options.batch_size]:
                try:
                    images.append(open_for_captioning(item.path))
                    batch.append(item)
                except (CaptioningError, ValueError, OSError, MemoryError) as exc:
                    summary.failed += 1
                    done += 1
                    why = getattr(exc, "reason", None) or exc
                    yield CaptionWarning(shown(f"skipped {_rel(item.path, root)}: {why}"), done=done)
            results = model.caption_batch(images) if images else []
            for item, parts in zip(batch, results):
                done += 1
                event = _write_one(root, item, parts, options, writer, summary, done)
                if event.action == "failed":
                    yield CaptionWarning(event.message, done=done)
                yield event
    finally:
        model.close()
    yield CaptionDone(summary)


def _write_one(root: Path, item, parts: list[str], options: CaptionOptions, writer: CaptionWriter,
               summary: CaptionSummary, done: int):
    """The caption of one image written (or, in a dry run, described); returns its event."""
    from ..data.captions import CaptionWriteError

    target = item.path.with_suffix(options.extension)
    old = item.caption if item.caption_source != "default" else ""
    image, caption_file = _rel(item.path, root), _rel(target, root)
    if not parts:
        summary.empty += 1
        return CaptionImage(done, image, caption_file, "empty", old, old)
    new = compose(old, parts, options.mode if old else "overwrite", options.trigger_word)
    if options.dry_run:
        exists = target.exists()
        if exists and " ".join(old.split()) == new:
            summary.unchanged += 1
            return CaptionImage(done, image, caption_file, "unchanged", old, new)
        summary.replaced += exists
        summary.created += not exists
        summary.tags.update(t for t in split_tags(new) if t != options.trigger_word)
        summary.changes.append((caption_file, old, new))
        return CaptionImage(done, image, caption_file, "would replace" if exists else "would create", old, new)
    try:
        action = writer.write(target, new)
    except (CaptioningError, CaptionWriteError, ValueError, OSError) as exc:  # this caption only; the run goes on
        summary.failed += 1
        return CaptionImage(done, image, caption_file, "failed", old, old, message=str(exc))
    if action == "unchanged":
        summary.unchanged += 1
    else:
        setattr(summary, action, getattr(summary, action) + 1)
        summary.tags.update(t for t in split_tags(new) if t != options.trigger_word)
    return CaptionImage(done, image, caption_file, action, old, new)
