"""The training loop's own failure."""

from __future__ import annotations

from ..errors import UserError


class TrainingError(UserError, RuntimeError):
    """A failure with a message meant for the user."""
