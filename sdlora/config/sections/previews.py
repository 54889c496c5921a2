"""Preview images during a run: when, from which prompts, with how many sampling steps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, field_validator

from ..checks import at_most, clean_text, non_negative_int, positive_int
from ..errors import ConfigError
from ..flags import Flag


class PreviewSettings(BaseModel):
    sample_every: Annotated[int, Flag("--sample-every")] = Field(
        0, description="preview every N steps (0 = only at the end, if prompts are given)")
    sample_prompts: Annotated[list[str], Flag("--sample-prompt", repeat=True, help="a prompt line; repeatable")] = Field(
        default_factory=list, description="prompt lines (kohya options --n --w --h --d --l --s)")
    sample_prompts_file: Annotated[str, Flag("--sample-prompts", help="file with one prompt per line (kohya options "
                                                                      "--n --w --h --d --l --s)")] = ""
    sample_steps: Annotated[int, Flag("--sample-steps")] = 20

    _preview_limits = field_validator("sample_steps", "sample_every")(
        at_most({"sample_steps": 1000, "sample_every": 10_000_000}))
    _preview_counts = field_validator("sample_every")(non_negative_int)
    _preview_steps = field_validator("sample_steps")(positive_int)
    _preview_text = field_validator("sample_prompts")(clean_text)

    def all_sample_prompts(self) -> list[str]:
        prompts = list(self.sample_prompts)
        if self.sample_prompts_file:
            path = Path(self.sample_prompts_file).expanduser()
            from ...fileio import read_text_limited

            try:  # a regular file of at most 1 MiB: a FIFO or device must never block or flood a run
                text = read_text_limited(path)
            except ValueError as exc:
                raise ConfigError(f"sample_prompts_file: {exc}. Give a prompt file (one prompt per line) or clear the field.") from None
            except OSError as exc:
                raise ConfigError(f"sample_prompts_file: cannot read '{path}' ({exc.strerror or exc}). Fix the path or clear the field.") from exc
            if "\x00" in text:  # a binary file picked by mistake would become a screenful of garbage previews
                from ...safetext import shown

                raise ConfigError(f"sample_prompts_file: '{shown(path)}' is a binary file, not a text file of prompts. Give a "
                                  "prompt file (one prompt per line) or clear the field.")
            prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return prompts
