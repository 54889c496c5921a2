"""The library's messages name CLI flags ("Point --data at ..."), which is right in a terminal. On the page the same
setting is a field: these phrases become the field's label and tab, so a message tells a browser user what to change."""

from __future__ import annotations

import re

# (phrase in a library message, what the page calls it). Phrases, not bare flags, so the sentence still reads.
_PHRASES: list[tuple[str, str]] = [
    (r"[Pp]oint --data at", "Point the Dataset folder field (Dataset tab) at"),
    (r"\(--data\)", "(the Dataset folder field, Dataset tab)"),
    (r"pass --allow-pickle", "tick 'Allow pickle' on the Model tab"),
    (r"\(--allow-pickle\)", "('Allow pickle', Model tab)"),
    (r"pass the base model \(--base-model\)", "choose the base model"),
    (r"pass --base-model", "choose the base model"),
    (r"\(--buckets\)", "('Aspect-ratio buckets', Training tab)"),
    (r"\(--masked-loss\)", "('Masked loss', Training tab)"),
    (r"use --optimizer adamw", "choose Optimizer adamw on the Training tab"),
    (r"\(--param\)", "(the method's value field)"),
]
_COMPILED = [(re.compile(p), text) for p, text in _PHRASES]


def for_the_ui(message: str) -> str:
    for pattern, text in _COMPILED:
        message = pattern.sub(text, message)
    return message
