"""The Gradio web UI: a thin layer over sdlora's library calls."""

from .layout import build_app, make_service

__all__ = ["build_app", "make_service"]
