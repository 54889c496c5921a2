"""How a setting appears on the `train` command line: a `Flag` in the field's annotation, read by sdlora.cli.

    rank: Annotated[int, Flag("--rank")] = Field(16, ...)

The flag's type and choices come from the field's type, so the command line offers the same values the config
accepts; `help` is the short line `train --help` shows (the field's description is the long one)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    name: str
    help: str | None = None
    sets: bool | None = None  # a switch: the flag alone sets the field to this (True, or False for --no-... flags)
    parse: Callable[[str], Any] | None = None  # instead of the field's type
    metavar: str | None = None
    repeat: bool = False  # may be given more than once; the values form a list
    offer_choices: bool = True  # a Literal field's values as argparse choices


def learning_rates(value: str):
    """`5e-5` or, for SDXL's two text encoders, `5e-5,1e-5`."""
    try:
        parts = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a learning rate: give one, or two for SDXL as TE1,TE2, e.g. 5e-5,1e-5")
    return parts[0] if len(parts) == 1 else parts
