"""Which base model a run starts from, and how it is read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ..flags import Flag

PredictionType = Literal["auto", "epsilon", "v_prediction"]


class ModelSettings(BaseModel):
    base_model: Annotated[str, Flag("--base-model")] = Field(
        "builtin:tiny", description="builtin:tiny, a diffusers folder, a .safetensors/.ckpt file or a hub id")
    prediction_type: Annotated[PredictionType, Flag("--prediction-type")] = "auto"
    allow_pickle: Annotated[bool, Flag("--allow-pickle", sets=True)] = Field(
        False, description="allow full pickle loading of .ckpt files (unsafe: only for files you trust)")
