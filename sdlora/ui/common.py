"""Small helpers shared by the tabs: turning library errors into messages on the page."""

from __future__ import annotations

import functools
import logging
import traceback

import gradio as gr

log = logging.getLogger("sdlora.ui")


def user_message(exc: BaseException) -> str:
    from ..errors import USER_ERRORS

    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"Unexpected error: {type(exc).__name__}: {exc}"


def guard(fn):
    """Run a UI handler; any failure becomes a readable message on the page, never a traceback or a dead server."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - the server must survive any handler failure
            from ..errors import USER_ERRORS

            if not isinstance(exc, USER_ERRORS):
                log.error("handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(user_message(exc), duration=None) from None

    return wrapper
