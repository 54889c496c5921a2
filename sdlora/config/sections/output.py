"""What a run writes and where: the output folder and name, logs, checkpoints, the exported file's format."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from ..checks import at_most, non_negative_int
from ..flags import Flag

OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
LogWith = Literal["none", "tensorboard"]
SavePrecision = Literal["fp16", "bf16", "fp32"]
FileFormat = Literal["kohya", "diffusers"]


class OutputSettings(BaseModel):
    output_dir: Annotated[str, Flag("--output")] = Field(
        "outputs/lora", description="where the LoRA, samples, checkpoints and logs go")
    output_name: Annotated[str, Flag("--output-name")] = Field(
        "lora", description="file name of the exported LoRA, without extension")
    log_with: Annotated[LogWith, Flag("--log-with", help="also log to TensorBoard (OUTPUT/logs/tensorboard)")] = Field(
        "none", description="also log loss, lr and val_loss to TensorBoard (OUTPUT/logs/tensorboard)")
    save_every: Annotated[int, Flag("--save-every")] = Field(0, description="checkpoint every N steps (0 = off)")
    resume: Annotated[str, Flag("--resume", help="checkpoint folder, or 'latest' for the newest under "
                                                 "OUTPUT/checkpoints")] = Field(
        "", description="checkpoint folder to resume from, or 'latest'")
    save_precision: Annotated[SavePrecision, Flag("--save-precision")] = "fp16"
    format: Annotated[FileFormat, Flag("--format")] = "kohya"

    _output_limits = field_validator("save_every")(at_most({"save_every": 10_000_000}))
    _output_counts = field_validator("save_every")(non_negative_int)

    @field_validator("output_name")
    @classmethod
    def _output_name_safe(cls, v: str) -> str:
        v = v.strip()
        if v.endswith(".safetensors"):
            v = v[: -len(".safetensors")]
        if not OUTPUT_NAME_RE.fullmatch(v) or ".." in v:
            raise ValueError("use letters, digits, '.', '_', '-' or spaces only (no folders, no '..'), e.g. my_lora")
        return v

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()
