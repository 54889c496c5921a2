"""Turning failures into messages on the page: a handler never shows a traceback and never takes the server down."""

from __future__ import annotations

import functools
import html
import logging

import gradio as gr

log = logging.getLogger("sdlora.ui")


def user_message(exc: BaseException, context: str = "the web UI") -> str:
    """The library's own sentence for user errors; for anything else one sentence saying what failed and where its
    traceback was written (the same error boundary as the CLI and the job queue: sdlora.errorlog)."""
    from ..errorlog import describe
    from .wording import for_the_ui

    return for_the_ui(describe(exc, context=context))


def guard(fn):
    """Wrap a UI/API handler: user errors become their message in an error pop-up (and the API's error text);
    anything else becomes one sentence naming what failed and the log file holding its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.print_exception = False  # our own messages: no traceback in the console
            raise
        except Exception as exc:
            # The traceback goes to a log file (named in the message), not onto the page or the console.
            message = user_message(exc, context=f"web UI: {getattr(fn, '__name__', 'handler')}")
            # The pop-up renders HTML: escape, so a file name can never inject markup.
            raise gr.Error(html.escape(message, quote=False), duration=None, print_exception=False) from None

    return wrapper
