"""Caption handling: tags, trigger word, shuffling with keep-tokens, dropout, and safe (atomic) writing."""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_path
from .images import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = (".txt", ".caption")


class CaptionWriteError(UserError, ValueError):
    """Caption files that could not be written; the message names them. `written` is how many others were."""

    def __init__(self, message: str, *, failed=(), written: int = 0):
        super().__init__(message)
        self.failed = list(failed)  # (path, reason)
        self.written = written


def split_tags(caption: str) -> list[str]:
    """Comma-separated parts, stripped, empty parts dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def is_trigger_tag(tag: str, trigger: str) -> bool:
    return tag == trigger or tag.startswith(trigger + " ")


def build_caption(caption: str, *, trigger_word: str | None = None, shuffle_tags: bool = False, keep_tokens: int = 0,
                  caption_dropout: float = 0.0, rng: random.Random | None = None, tag_dropout: float = 0.0) -> str:
    """The caption the model sees for one step. Deterministic for a given `rng` state.

    - The trigger word always comes first and is not counted in keep_tokens. A caption whose first tag already is
      the trigger (or starts with it as a word, e.g. "sks person") keeps that tag first; other tags equal to the
      trigger are dropped, so it never appears twice.
    - shuffle_tags keeps the first keep_tokens tags in place and shuffles the rest.
    - caption_dropout is the chance of returning "" - the unconditional caption, trigger word included, as kohya
      does - which teaches the LoRA to work without its prompt too.
    - tag_dropout (kohya's caption_tag_dropout_rate) drops each tag after the first keep_tokens with this chance,
      after shuffling; the trigger word stays.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be between 0 and 1, not {caption_dropout}.")
    rng = rng or random.Random()
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    tags = split_tags(caption)
    trigger = (trigger_word or "").strip()
    head = []
    if trigger:
        head = [tags.pop(0)] if tags and is_trigger_tag(tags[0], trigger) else [trigger]
        tags = [t for t in tags if t != trigger]
    keep = max(0, keep_tokens)
    if shuffle_tags and len(tags) > keep + 1:
        tail = tags[keep:]
        rng.shuffle(tail)
        tags = tags[:keep] + tail
    if tag_dropout > 0:
        tags = tags[:keep] + [t for t in tags[keep:] if rng.random() >= tag_dropout]
    return ", ".join(head + tags)


def _inside(path: Path, root: Path) -> bool:
    # resolve() follows symlinks, so a caption file linked to somewhere outside the dataset is refused too
    return path.resolve().is_relative_to(root.resolve())


def caption_path_for(path) -> Path:
    """The caption file an image path refers to (same stem + .txt); caption paths are returned unchanged."""
    path = Path(path)
    return path.with_suffix(".txt") if path.suffix.lower() in IMAGE_EXTENSIONS else path


def write_caption(caption_path, text: str, *, root=None) -> Path:
    """Write a caption atomically (temp file in the same folder, fsync, rename): a failure never destroys the old
    text. Accepts the image's path too (writes its same-stem .txt). With `root`, relative paths are taken inside
    it and a path that resolves outside it is refused with ValueError."""
    path = caption_path_for(caption_path)
    if root is not None:
        root = Path(root)
        if not path.is_absolute():
            path = root / path
        if not _inside(path, root):
            raise ValueError(f"Refusing to write caption '{path}': it is outside the dataset folder '{root}'.")
    if path.suffix.lower() not in CAPTION_EXTENSIONS:
        raise ValueError(f"Refusing to write caption '{path}': caption files end in {' or '.join(CAPTION_EXTENSIONS)}.")
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    from ..outputs import OutputError
    from ..safetext import clean_text, shown

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(clean_text(text).replace("\x00", "").strip() + "\n", encoding="utf-8")
            os.chmod(tmp, mode)  # temp files are created 0600; keep the caption as readable as it was
    except (OSError, OutputError) as exc:  # read-only folder, full disk, a name too long, a folder in the way ...
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "it is a folder or a special file"
        raise CaptionWriteError(f"Cannot write caption '{shown(path)}': {reason}. The old caption (if any) is unchanged.",
                                failed=[(path, reason)]) from None
    return path


def _edit(text: str, find: str, replace: str, prepend: str, append: str) -> str:
    new = text.replace(find, replace) if find else text
    # A prefix ending in a space ("photo of ") is joined as-is; otherwise it is a tag joined with ", ".
    # Either way it is not added twice, so running the same edit again changes nothing.
    if prepend.strip():
        joined = prepend if prepend.endswith(" ") else prepend.strip() + ", "
        if not (new.startswith(joined) or new == joined.strip(" ,")):
            new = joined + new if new else joined.strip(" ,")
    if append.strip():
        joined = append if append.startswith(" ") else ", " + append.strip()
        if not (new.endswith(joined) or new == joined.strip(" ,")):
            new = new + joined if new else joined.strip(" ,")
    return new


def bulk_edit_captions(report_or_items, *, find: str = "", replace: str = "", prepend: str = "", append: str = "",
                       root=None) -> int:
    """Find/replace, then prepend and append, on every caption; returns how many caption files changed.

    Takes a DatasetReport (its root is used when `root` is not given) or a list of ImageItems, and updates the
    items in place. Images without a caption (caption_source "default") are left alone: their caption comes from
    the training config. A caption that came from metadata.jsonl is written to a new same-stem .txt, which then
    takes precedence. Each file is written atomically; a caption file shared by two images is edited once.
    """
    items = getattr(report_or_items, "items", report_or_items)
    if root is None:
        root = getattr(report_or_items, "root", None)
    written: dict[Path, str] = {}
    failed: list[tuple[Path, str]] = []
    for item in items:
        if item.caption_source == "default":
            continue
        path = Path(item.caption_path or caption_path_for(item.path))
        if path in written:
            item.caption = written[path]
            continue
        new = _edit(item.caption, find, replace, prepend, append)
        if new == item.caption:
            continue
        try:
            write_caption(path, new, root=root)
        except CaptionWriteError as exc:  # say which ones failed, but finish the others
            failed += exc.failed
            continue
        written[path] = new
        item.caption, item.caption_path = new, path
        if item.caption_source == "metadata":
            item.caption_source = "txt"
    if failed:
        from ..safetext import shown

        names = ", ".join(f"{shown(p.name)} ({why})" for p, why in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise CaptionWriteError(f"{len(written)} caption file(s) changed, but {len(failed)} could not be written: {names}{more}. "
                                "Those captions are unchanged.", failed=failed, written=len(written))
    return len(written)
