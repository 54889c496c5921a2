"""Which base model a run starts from, and how it is read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from ..flags import Flag

PredictionType = Literal["auto", "epsilon", "v_prediction"]


class ModelSettings(BaseModel):
    base_model: Annotated[str, Flag("--base-model")] = Field(
        "builtin:tiny", description="builtin:tiny, a diffusers folder, a .safetensors/.ckpt file or a hub id")
    prediction_type: Annotated[PredictionType, Flag("--prediction-type")] = "auto"
    allow_pickle: Annotated[bool, Flag("--allow-pickle", sets=True)] = Field(
        False, description="allow full pickle loading of .ckpt files (unsafe: only for files you trust)")
    clip_skip: Annotated[int, Flag("--clip-skip")] = Field(
        1, description="condition on the text encoder's k-th layer from the end (2 for anime-style SD1 models; "
                       "SD1/SD2 only, SDXL always uses its penultimate layer)")

    @field_validator("clip_skip")
    @classmethod
    def _clip_skip(cls, v: int) -> int:
        if not 1 <= v <= 12:
            raise ValueError("must be between 1 (the last layer) and 12 (2 is usual for anime-style SD1 models)")
        return v
