"""The error every configuration check raises."""

from __future__ import annotations

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the user: names the field and what to do."""
