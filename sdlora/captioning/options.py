"""What a captioning run is asked to do. Every value is checked when the options are made, so a bad one is a sentence
naming its setting before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UserError

MODES = ("skip", "overwrite", "append", "prepend")
KINDS = ("wd14", "captioner")
EXTENSIONS = (".txt", ".caption")
DEVICES = ("auto", "cpu", "cuda")
MAX_BATCH = 256


class CaptioningError(UserError, ValueError):
    """A captioning run that cannot go ahead: the message names the file or setting and says what to do."""


def _fraction(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CaptioningError(f"{name}: enter a number between 0 and 1, not {value!r}.") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise CaptioningError(f"{name}: must be between 0 and 1, not {value}.")
    return value


def _whole(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CaptioningError(f"{name}: enter a whole number from {low} to {high}, not {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise CaptioningError(f"{name}: enter a whole number from {low} to {high}, not {value}.")
    return int(number)


def parse_tag_list(text: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_replacements(text: str) -> list[tuple[str, str]]:
    """`old,new;old2,new2` (kohya's --tag_replacement): pairs split on ';', each pair on its first ','. A backslash
    keeps a ',' or ';' that is part of a tag. An empty `new` removes the tag."""
    pairs, item, pair = [], "", []
    escaped = False
    for ch in (text or "") + ";":
        if escaped:
            item += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "," and not pair:
            pair.append(item)
            item = ""
        elif ch == ";":
            if pair or item.strip():
                if not pair:
                    raise CaptioningError(f"tag replacement '{item.strip()}': write it as old,new (pairs separated by ';', "
                                          "e.g. 1girl,woman;1boy,man).")
                old, new = pair[0].strip(), item.strip()
                if not old:
                    raise CaptioningError(f"tag replacement ',{new}': the tag to replace is empty; write it as old,new.")
                pairs.append((old, new))
            item, pair = "", []
        else:
            item += ch
    return pairs


@dataclass
class TagOptions:
    """How a tagger's probabilities become tags."""

    threshold: float = 0.35  # general tags
    character_threshold: float = 0.85
    include_ratings: bool = False  # the most likely rating tag (general, sensitive, ...), last
    undesired: list[str] = field(default_factory=list)
    replacements: list[tuple[str, str]] = field(default_factory=list)
    underscores_to_spaces: bool = True
    max_tags: int = 0  # 0 = no limit (character and general tags together)

    def __post_init__(self):
        self.threshold = _fraction("threshold", self.threshold)
        self.character_threshold = _fraction("character threshold", self.character_threshold)
        self.max_tags = _whole("max tags", self.max_tags or 0, 0, 1000)
        if isinstance(self.undesired, str):
            self.undesired = parse_tag_list(self.undesired)
        if isinstance(self.replacements, str):
            self.replacements = parse_replacements(self.replacements)


@dataclass
class TextOptions:
    """How a caption model writes: beam search by default, sampling on request; prefix/suffix around the text."""

    max_length: int = 40  # new tokens
    min_length: int = 5
    num_beams: int = 3
    sample: bool = False
    top_p: float = 0.9
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self):
        self.max_length = _whole("max length", self.max_length, 1, 512)
        self.min_length = _whole("min length", self.min_length, 0, self.max_length)
        self.num_beams = _whole("beams", self.num_beams, 1, 16)
        self.top_p = _fraction("top p", self.top_p)
        if self.sample and self.top_p == 0:
            raise CaptioningError("top p: sampling needs a value above 0, e.g. 0.9.")


@dataclass
class CaptionOptions:
    """One run: which model, how to write, what to do with captions already there."""

    kind: str  # "wd14" | "captioner"
    model: str  # a folder, a model.onnx file, or a hub id (found in model_dirs' OWNER_NAME folders or the hub cache)
    mode: str = "skip"
    extension: str = ".txt"
    batch_size: int = 8
    dry_run: bool = False
    trigger_word: str = ""
    device: str = "auto"
    model_dirs: list = field(default_factory=list)  # where kohya's OWNER_NAME folders are looked for
    tags: TagOptions = field(default_factory=TagOptions)
    text: TextOptions = field(default_factory=TextOptions)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise CaptioningError(f"model kind: choose wd14 (a tagger) or captioner (a caption model), not {self.kind!r}.")
        self.model = (self.model or "").strip()
        if not self.model:
            which = "tagger folder (holding model.onnx and selected_tags.csv)" if self.kind == "wd14" else \
                "caption model folder (holding config.json)"
            raise CaptioningError(f"model: enter the {which}.")
        if self.mode not in MODES:
            raise CaptioningError(f"mode: choose one of {', '.join(MODES)}, not {self.mode!r}.")
        ext = (self.extension or ".txt").strip().lower()
        self.extension = ext if ext.startswith(".") else f".{ext}"
        if self.extension not in EXTENSIONS:
            raise CaptioningError(f"caption extension: choose .txt or .caption, not {self.extension!r}.")
        self.batch_size = _whole("batch size", self.batch_size, 1, MAX_BATCH)
        if self.device not in DEVICES:
            raise CaptioningError(f"device: choose auto, cpu or cuda, not {self.device!r}.")
        self.trigger_word = (self.trigger_word or "").strip()
