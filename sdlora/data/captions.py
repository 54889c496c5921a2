"""Caption handling: tags, trigger word, shuffling with keep-tokens, dropout, and safe writing."""

from __future__ import annotations

import random
from pathlib import Path

from ..fileio import atomic_write_text


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def build_caption(caption: str, *, trigger_word: str | None = None, shuffle_tags: bool = False, keep_tokens: int = 0,
                  caption_dropout: float = 0.0, rng: random.Random | None = None) -> str:
    """The caption the model sees for one step.

    The trigger word always comes first and is not counted in keep_tokens. Dropout returns "" (the
    unconditional caption, as kohya does), which teaches the LoRA to act without its prompt too.
    """
    rng = rng or random.Random()
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    tags = split_tags(caption)
    trigger = (trigger_word or "").strip()
    if trigger and tags and tags[0] == trigger:
        tags = tags[1:]
    if shuffle_tags and len(tags) > keep_tokens + 1:
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        tags = head + tail
    if trigger:
        tags = [trigger] + tags
    return ", ".join(tags)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def write_caption(caption_path, text: str, *, root=None) -> Path:
    """Write a caption atomically (temp file + rename): a failure never destroys the old text."""
    path = Path(caption_path)
    if root is not None and not _inside(path, Path(root)):
        raise ValueError(f"Refusing to write caption '{path}': it is outside the dataset folder '{root}'.")
    if path.suffix.lower() not in (".txt", ".caption"):
        raise ValueError(f"Refusing to write caption '{path}': captions are .txt or .caption files.")
    return atomic_write_text(path, text.strip() + "\n")


def bulk_edit_captions(items, *, find: str = "", replace: str = "", prepend: str = "", append: str = "", root=None) -> int:
    """Apply find/replace, prepend and append to every item's caption; returns how many files changed."""
    changed = 0
    for item in items:
        old = item.caption
        new = old.replace(find, replace) if find else old
        if prepend and not new.startswith(prepend):
            new = f"{prepend}{', ' if new else ''}{new}" if not prepend.rstrip().endswith(",") else prepend + new
        if append and not new.endswith(append):
            new = f"{new}{', ' if new else ''}{append}"
        if new != old:
            write_caption(item.caption_path, new, root=root)
            item.caption = new
            changed += 1
    return changed
