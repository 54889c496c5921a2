"""The user-facing error base: every exception whose message is a sentence for the user (naming the file or setting
and what to do) derives from UserError. The CLI, the job queue and the UI print those as they are; anything else is
a bug, reported with a pointer to the traceback log. This module imports nothing, so catching user errors does not
load torch or diffusers."""

from __future__ import annotations


class UserError(Exception):
    """A failure phrased for the user."""


# OS errors about a named path (a missing file, no permission) read well as they are.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError)
