"""Turning failures into messages on the page: a handler never shows a traceback and never takes the server down."""

from __future__ import annotations

import functools
import html
import logging

import gradio as gr

log = logging.getLogger("sdlora.ui")


def user_message(exc: BaseException) -> str:
    """The library's own sentence for user errors; one line for anything else."""
    from ..errors import USER_ERRORS

    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"Unexpected error: {type(exc).__name__}: {exc}".splitlines()[0]


def guard(fn):
    """Wrap a UI/API handler: user errors become their message in an error pop-up (and the API's error text);
    anything else becomes a one-line 'Unexpected error: ...' and its traceback goes to the server log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.print_exception = False  # our own messages: no traceback in the console
            raise
        except Exception as exc:
            from ..errors import USER_ERRORS

            if not isinstance(exc, USER_ERRORS):
                log.exception("handler %s failed", getattr(fn, "__name__", fn))
            # The pop-up renders HTML: escape, so a file name can never inject markup.
            raise gr.Error(html.escape(user_message(exc), quote=False), duration=None, print_exception=False) from None

    return wrapper
