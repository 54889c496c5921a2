"""A diffusers/PEFT-format LoRA file (`unet.<path>.lora_A.weight`, alpha in the stored LoRA configs) in kohya terms,
so every reader judges and applies one layout."""

from __future__ import annotations

import json
import math
import re

import torch

from ..families import FAMILIES
from ..safetext import shown
from .kohya_names import DIFFUSERS_COMPONENTS
from .lora_file import LoraLoadError

_KEY = re.compile(rf"({'|'.join(DIFFUSERS_COMPONENTS)})\.(.+)\.lora_([AB])\.weight")


def _adapter_configs(metadata: dict[str, str], source) -> dict[str, dict]:
    """The LoRA configs diffusers stores in the file ("unet.lora_alpha": 4, ...), grouped by component; a damaged one is
    refused with a sentence (diffusers would fail on it with a traceback, or load wrong ranks silently)."""
    if "lora_adapter_metadata" not in metadata:
        return {}

    def bad(why: str) -> LoraLoadError:
        return LoraLoadError(f"'{shown(source)}' has damaged diffusers metadata: {why}. Re-export the LoRA "
                             "(python -m sdlora export FILE --format diffusers) or use the kohya file.")

    try:
        raw = json.loads(metadata["lora_adapter_metadata"])
    except (ValueError, RecursionError):
        raise bad("lora_adapter_metadata is not valid JSON") from None
    if not isinstance(raw, dict):
        raise bad("lora_adapter_metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in raw.items():
        prefix, _, field = str(key).partition(".")
        configs.setdefault(prefix, {})[field] = value
    for part, cfg in configs.items():
        for name in ("lora_alpha", "r"):
            v = cfg.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise bad(f"{part}.{name} is {v!r}, not a positive number")
        for name in ("alpha_pattern", "rank_pattern"):
            patterns = cfg.get(name)
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise bad(f"{part}.{name} is not a mapping")
            for pattern, v in patterns.items():
                try:
                    re.compile(pattern)
                except re.error:
                    raise bad(f"{part}.{name} has an invalid pattern {pattern!r}") from None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise bad(f"{part}.{name}[{pattern!r}] is {v!r}, not a positive number")
    return configs


def _configured(cfg: dict, field: str, pattern_field: str, path: str, default):
    value = cfg.get(field, default)
    for pattern, v in (cfg.get(pattern_field) or {}).items():
        if re.search(pattern, path):
            value = v
    return value


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family=None,
                       unet_config=None, *, source="LoRA file") -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format file in kohya terms, named by the family's rule; alpha comes from the
    stored LoRA config. Damaged metadata raises LoraLoadError naming `source`."""
    family = family or FAMILIES["sd1"]
    configs = _adapter_configs(metadata, source)
    out = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if not m or m.group(1) not in ("unet", *family.text_encoder_names):
            out[key] = value
            continue
        part, path, ab = m.groups()
        try:
            prefix = family.kohya_prefix(part, path, unet_config)
        except ValueError:
            prefix = None
        if prefix is None:
            out[key] = value
            continue
        out[f"{prefix}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = value
        if ab == "A" and value.dim() >= 1:  # a malformed A (0-d) is named by the shape checks later
            cfg = configs.get(part, {})
            # Only the plain case is judged here (per-module patterns are PEFT's to match); diffusers builds the layers
            # from this number, so a wrong one would fail inside its loader.
            rank = None if cfg.get("rank_pattern") else cfg.get("r")
            if rank is not None and int(rank) != value.shape[0]:
                raise LoraLoadError(f"'{shown(source)}' has damaged diffusers metadata: it says rank {rank} for {part}.{path}, "
                                    f"but the weights have rank {value.shape[0]}. Re-export the LoRA or use the kohya file.")
            alpha = _configured(cfg, "lora_alpha", "alpha_pattern", path, value.shape[0])
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out
