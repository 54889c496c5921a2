"""Value checks shared by the settings sections; each raises ValueError with the sentence the user sees after the
field name. A section attaches one to its fields with `field_validator(*names)(check)`."""

from __future__ import annotations

import math


def at_most(limits: dict[str, int]):
    """Upper bounds for settings whose absurd values would pass every other check and then hang or overflow a run."""
    def check(v: int | None, info) -> int | None:
        if v is not None and v > limits[info.field_name]:
            raise ValueError(f"must be at most {limits[info.field_name]:,}")
        return v

    return check


def positive_int(v: int) -> int:
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def positive_or_none(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError("must be at least 1")
    return v


def non_negative_int(v: int) -> int:
    if v < 0:
        raise ValueError("must be 0 or more")
    return v


def non_negative_float(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError("must be 0 or a positive number")
    return v


def fraction(usual: dict[str, float]):
    """A share above 0 and at most 1; the sentence names the field's usual value."""
    def check(v: float, info) -> float:
        if not math.isfinite(v) or not 0 < v <= 1:
            raise ValueError(f"must be above 0 and at most 1 ({usual[info.field_name]:g} is usual)")
        return v

    return check


def dropout_rate(v: float) -> float:
    if not math.isfinite(v) or v < 0 or v >= 1:
        raise ValueError("must be at least 0 and below 1 (0 = off; 0.1 is usual)")
    return v


def clean_text(v):
    # Text from a command line or a file name that is not UTF-8 carries surrogate escapes, which no tokenizer or
    # metadata writer accepts: keep what can be kept, mark the rest with U+FFFD.
    from ..safetext import clean_text as clean

    return [clean(x) for x in v] if isinstance(v, list) else clean(v)
