"""WD14-style taggers (the SmilingWolf wd-v1-4 and wd-v3 families): selected_tags.csv, the ONNX model through
onnxruntime, and choosing tags from the probabilities."""

from __future__ import annotations

import csv
import gc
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fileio import UserFileError, read_user_head, read_text_limited
from ..safetext import shown
from .images import wd14_batch
from .locate import WD14_MODEL, WD14_TAGS
from .options import CaptioningError, TagOptions

RATING, GENERAL, CHARACTER = 9, 0, 4  # selected_tags.csv's category column
TAGS_HEADER = ["tag_id", "name", "category", "count"]
TAGS_LIMIT = 16 << 20  # the wd-v3 lists are about 300 KB
_LFS_POINTER = b"version https://git-lfs"  # what a clone without git-lfs holds in place of the weights
_WORDY = re.compile(r"[A-Za-z0-9]{2}")


@dataclass
class TagList:
    names: list[str]
    categories: np.ndarray  # int, one per tag

    def __len__(self) -> int:
        return len(self.names)


def read_tag_list(path: Path) -> TagList:
    """selected_tags.csv with the header tag_id,name,category,count. Raises CaptioningError naming the file and line."""
    try:
        text = read_text_limited(path, TAGS_LIMIT)
    except (UserFileError, OSError) as exc:
        raise CaptioningError(f"Cannot read the tag list '{shown(path)}': {getattr(exc, 'reason', None) or exc}. "
                              f"Copy {WD14_TAGS} from the tagger's download next to {WD14_MODEL}.") from None
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    header = [c.strip() for c in rows[0]] if rows else []
    if header[:3] != TAGS_HEADER[:3]:
        raise CaptioningError(f"The tag list '{shown(path)}' does not start with the header {','.join(TAGS_HEADER)} "
                              f"(it starts with {','.join(header)[:80] or 'nothing'!r}): it is not a WD14 {WD14_TAGS}. "
                              "Copy the file from the tagger's download.")
    names, categories = [], []
    for line, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        try:
            name, category = row[1].strip(), int(row[2])
        except (IndexError, ValueError):
            raise CaptioningError(f"The tag list '{shown(path)}' line {line} is not tag_id,name,category,count "
                                  f"(it reads {','.join(row)[:80]!r}). Copy the file from the tagger's download.") from None
        names.append(name)
        categories.append(category)
    if not names:
        raise CaptioningError(f"The tag list '{shown(path)}' holds no tags. Copy the file from the tagger's download.")
    return TagList(names, np.asarray(categories, dtype=np.int64))


def display_name(tag: str, underscores_to_spaces: bool = True) -> str:
    """The tag as written to a caption: underscores become spaces, except in kaomoji (^_^, o_o), which need them."""
    if not underscores_to_spaces or not _WORDY.search(tag):
        return tag
    return tag.replace("_", " ")


def select_tags(probs: np.ndarray, tags: TagList, options: TagOptions) -> list[tuple[str, float]]:
    """(tag, probability) for one image: character tags first, then general ones, each most likely first; with
    include_ratings the most likely rating last. Undesired tags are dropped, replacements applied, duplicates removed."""
    cats = tags.categories
    undesired = {display_name(t, options.underscores_to_spaces) for t in options.undesired}
    undesired |= set(options.undesired)
    replace = {display_name(old, options.underscores_to_spaces): new for old, new in options.replacements}
    picked: list[tuple[str, float]] = []
    for category, threshold in ((CHARACTER, options.character_threshold), (GENERAL, options.threshold)):
        idx = np.nonzero((cats == category) & (probs >= threshold))[0]
        picked += [(tags.names[i], float(probs[i])) for i in idx[np.argsort(-probs[idx], kind="stable")]]
    if options.max_tags:
        picked = picked[: options.max_tags]
    if options.include_ratings:
        ratings = np.nonzero(cats == RATING)[0]
        if ratings.size:
            best = ratings[int(np.argmax(probs[ratings]))]
            picked.append((tags.names[best], float(probs[best])))
    out, seen = [], set()
    for raw, p in picked:
        name = display_name(raw, options.underscores_to_spaces)
        if name in undesired or raw in undesired:
            continue
        name = replace.get(name, name).strip()
        if name and name not in seen:
            seen.add(name)
            out.append((name, p))
    return out


def _providers(device: str) -> tuple[list[str], str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    if device == "cuda":
        raise CaptioningError("device cuda: onnxruntime here has no CUDA provider (install onnxruntime-gpu in place of "
                              "onnxruntime), or use device auto or cpu.")
    return ["CPUExecutionProvider"], "cpu"


def _check_onnx_file(path: Path) -> None:
    if not path.is_file():
        raise CaptioningError(f"The tagger folder '{shown(path.parent)}' has no {WD14_MODEL}. Download the tagger's "
                              f"{WD14_MODEL} and {WD14_TAGS} into it.")
    try:
        head = read_user_head(path, len(_LFS_POINTER))
    except (UserFileError, OSError) as exc:
        raise CaptioningError(f"Cannot read '{shown(path)}': {getattr(exc, 'reason', None) or exc}.") from None
    if not head:
        raise CaptioningError(f"'{shown(path)}' is empty, not an ONNX model. Download the tagger's {WD14_MODEL} again.")
    if head == _LFS_POINTER:
        raise CaptioningError(f"'{shown(path)}' is a Git LFS pointer, not the model: fetch the real file "
                              f"(`git lfs pull` in that clone, or `hf download`).")


class WD14Tagger:
    """One ONNX tagger session. `tag_batch(images)` gives each image's (tag, probability) list."""

    kind = "wd14"

    def __init__(self, folder: Path, options: TagOptions, *, model_file: Path | None = None, device: str = "auto"):
        self.folder = Path(folder)
        self.model_file = Path(model_file) if model_file else self.folder / WD14_MODEL
        self.options = options
        self.tags = read_tag_list(self.folder / WD14_TAGS)
        _check_onnx_file(self.model_file)
        self._device = device
        self.session = None
        self.size = 0
        self.device = ""

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptioningError("WD14 taggers need onnxruntime: run `pip install -r requirements.txt` "
                                  "(or `pip install onnxruntime`).") from None
        providers, self.device = _providers(self._device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # onnxruntime's own warnings are not ours to show
        try:
            self.session = ort.InferenceSession(str(self.model_file), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for a damaged or foreign file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CaptioningError(f"'{shown(self.model_file)}' is not a usable ONNX model ({first}). Download the "
                                  f"tagger's {WD14_MODEL} again.") from None
        self._check_shapes()

    def _check_shapes(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if inputs else []
        ok = len(inputs) == 1 and len(shape) == 4 and shape[3] == 3 and isinstance(shape[1], int) and shape[1] == shape[2]
        if not ok:
            raise CaptioningError(f"'{shown(self.model_file)}' takes input {shape}, not the WD14 layout N x size x size x 3 "
                                  "(one image batch, channels last). Use a wd-v1-4 or wd-v3 tagger.")
        self.size = int(shape[1])
        width = list(outputs[0].shape)[-1] if outputs and outputs[0].shape else None
        if isinstance(width, int) and width != len(self.tags):
            raise CaptioningError(f"'{shown(self.model_file)}' gives {width} tag probabilities but '{WD14_TAGS}' lists "
                                  f"{len(self.tags)} tags: the two files come from different taggers.")
        self._input, self._output = inputs[0].name, outputs[0].name
        # A model exported with a fixed batch of 1 is run one image at a time.
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def probabilities(self, images) -> np.ndarray:
        batch = wd14_batch(list(images), self.size)
        if self._fixed_batch:
            parts = [self.session.run([self._output], {self._input: batch[i:i + self._fixed_batch]})[0]
                     for i in range(0, len(batch), self._fixed_batch)]
            return np.concatenate(parts)
        return self.session.run([self._output], {self._input: batch})[0]

    def caption_batch(self, images) -> list[list[str]]:
        probs = self.probabilities(images)
        return [[name for name, _ in select_tags(row, self.tags, self.options)] for row in probs]

    def close(self) -> None:
        self.session = None
        gc.collect()
