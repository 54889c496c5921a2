"""Model families: SD1, SD2, SDXL. `FAMILIES` is the registry; the rest of sdlora asks a family, never a flag.

  base.py   the ModelFamily hooks and the values they pass around (TextEmbedding, SampleGeometry, Conditioning)
  sd.py     SD 1.x / SD 2.x
  sdxl.py   SDXL
"""

from __future__ import annotations

from .base import Conditioning, ModelFamily, SampleGeometry, TextEmbedding, cross_attention_width
from .sd import SD1, SD2
from .sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1(), SD2(), SDXL())}


def family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown model family '{name}' (known: {', '.join(FAMILIES)}).") from None


def _by_priority() -> list[ModelFamily]:
    return sorted(FAMILIES.values(), key=lambda f: -f.claim_priority)


def family_of_folder(index: dict, unet_config: dict) -> ModelFamily | None:
    return next((f for f in _by_priority() if f.claims_folder(index, unet_config)), None)


def family_of_checkpoint(keys) -> ModelFamily | None:
    """The family an original-layout checkpoint (key -> shape) is of, by its text encoders' keys; None without any."""
    return next((f for f in _by_priority() if f.claims_checkpoint(keys)), None)


def family_of_lora(keys) -> ModelFamily | None:
    keys = list(keys)
    return next((f for f in _by_priority() if f.claims_lora(keys)), None)


__all__ = ["Conditioning", "FAMILIES", "ModelFamily", "SampleGeometry", "TextEmbedding", "cross_attention_width", "family",
           "family_of_checkpoint", "family_of_folder", "family_of_lora", "family_of_pipeline", "native_resolutions"]


def family_of_pipeline(pipe) -> ModelFamily:
    """The family a diffusers pipeline belongs to (SD1 and SD2 share a pipeline class and kohya's naming)."""
    name = type(pipe).__name__
    return next((f for f in FAMILIES.values() if f.pipeline_class == name), FAMILIES["sd1"])


def native_resolutions() -> set[int]:
    """Every family's native training resolution."""
    return {f.native_resolution for f in FAMILIES.values()}
