"""Caption models through transformers, from a local folder only: BLIP and GIT (and BLIP-2), each through the model
class transformers ships for it. Code that comes with a model folder (trust_remote_code) is never run."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

from ..fileio import UserFileError, read_text_limited
from ..safetext import shown
from .locate import CONFIG
from .options import CaptioningError, TextOptions

# config.json's model_type -> the transformers class that writes captions for it.
SUPPORTED = {"blip": "BlipForConditionalGeneration", "git": "GitForCausalLM", "blip-2": "Blip2ForConditionalGeneration"}
SUPPORTED_NAMES = "BLIP (model_type blip), GIT (git) and BLIP-2 (blip-2)"


def read_model_type(folder: Path) -> str:
    """config.json's model_type, checked: a supported architecture, and no code of the model's own."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CaptioningError(f"The caption model folder '{shown(folder)}' has no {CONFIG}. Name the folder that holds "
                              f"the model's {CONFIG}, weights and processor files (a BLIP or GIT download).")
    try:
        config = json.loads(read_text_limited(path))
    except (UserFileError, OSError, ValueError) as exc:
        raise CaptioningError(f"Cannot read '{shown(path)}': {getattr(exc, 'reason', None) or exc}. Download the model "
                              "again.") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in SUPPORTED:
        what = f"model_type {kind!r}" if kind else "no model_type"
        raise CaptioningError(f"'{shown(path)}' has {what}: captioning supports {SUPPORTED_NAMES}. For tags, use a WD14 "
                              "tagger instead.")
    named = config.get("architectures")
    if isinstance(named, list) and named and SUPPORTED[kind] not in named:
        raise CaptioningError(f"'{shown(path)}' is a {', '.join(map(str, named))[:80]}, not a caption model: use a "
                              f"{SUPPORTED[kind]} download (its config.json names that class).")
    if isinstance(config.get("auto_map"), dict) and config["auto_map"]:
        raise CaptioningError(f"'{shown(path)}' asks to run the model folder's own code (auto_map); sdlora only loads "
                              f"the architectures transformers ships: {SUPPORTED_NAMES}.")
    return kind


def affix(text: str, prefix: str, suffix: str) -> str:
    """prefix + text + suffix. A prefix ending in a space ("photo of ") and a suffix starting with one are joined as
    they are; otherwise each is a tag joined with ", " (the rule of the bulk caption edit)."""
    text = text.strip()
    if prefix.strip():
        head = prefix if prefix.endswith(" ") else prefix.strip() + ", "
        text = head + text if text else prefix.strip(" ,")
    if suffix.strip():
        tail = suffix if suffix.startswith(" ") else ", " + suffix.strip()
        text = text + tail if text else suffix.strip(" ,")
    return text


class VisionCaptioner:
    """A caption model on CUDA when there is one (fp16), else the CPU. `caption_batch(images)` gives one text each."""

    kind = "captioner"

    def __init__(self, folder: Path, options: TextOptions, *, device: str = "auto"):
        self.folder = Path(folder)
        self.options = options
        self.model_type = read_model_type(self.folder)
        self._device = device
        self.model = self.processor = None
        self.device = ""

    def load(self) -> None:
        import torch
        import transformers

        if self._device == "cuda" and not torch.cuda.is_available():
            raise CaptioningError("device cuda: torch sees no CUDA device here; use device auto or cpu.")
        self.device = "cuda" if self._device != "cpu" and torch.cuda.is_available() else "cpu"
        cls = getattr(transformers, SUPPORTED[self.model_type])
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        transformers.utils.logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # image processors mention optional backends; not the user's business
                self.processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
                self.model = cls.from_pretrained(self.folder, local_files_only=True, dtype=dtype).to(self.device).eval()
        except Exception as exc:  # noqa: BLE001 - missing weights or processor files, a damaged download
            first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            self.close()
            raise CaptioningError(f"Cannot load the caption model in '{shown(self.folder)}': {first}. The folder needs "
                                  f"{CONFIG}, the weights (model.safetensors) and the processor and tokenizer files; "
                                  "download the model again.") from None
        self._dtype = dtype

    def caption_batch(self, images) -> list[list[str]]:
        import torch

        o = self.options
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        kwargs = dict(max_new_tokens=o.max_length, min_new_tokens=min(o.min_length, o.max_length))
        kwargs.update(dict(do_sample=True, top_p=o.top_p, num_beams=1) if o.sample else dict(num_beams=o.num_beams))
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **kwargs)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [[affix(" ".join(t.split()), o.prefix, o.suffix)] for t in texts]

    def close(self) -> None:
        """Free the model so training gets the memory back."""
        cuda = self.device == "cuda"
        self.model = self.processor = None
        gc.collect()
        if cuda:
            import torch

            torch.cuda.empty_cache()
