"""A job's snapshot as the Run tab shows it: one progress line and the loss plot's table."""

from __future__ import annotations

from typing import Any

from ...training.jobs import smooth
from ..wording import for_the_ui

PLOT_POINTS = 1500  # loss points per series sent to the browser


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_text(snap: dict[str, Any]) -> str:
    state = snap["state"]
    if state == "idle":
        return "No training job yet. Press **Start training**."
    loss = f"{snap['losses'][-1][1]:.4f}" if snap["losses"] else "–"
    speed = f"{snap['it_per_s']:.2f} it/s" if snap.get("it_per_s") else "– it/s"
    total = snap["total_steps"] or "?"
    text = (f"**Job {snap['id']}: {state}** — step {snap['step']}/{total} · loss {loss} · {speed} · "
            f"time left {format_eta(snap.get('eta_s'))}")
    if snap.get("plan"):
        text += f"\n\n{snap['plan']}"
        if snap.get("it_per_s"):
            text += f" (about {format_eta(snap['total_steps'] / snap['it_per_s'])} in all at {snap['it_per_s']:.2f} it/s)"
    waiting = [j for j in snap.get("queue", []) if j["state"] == "queued"]
    if waiting:
        text += f" · {len(waiting)} job(s) waiting"
    if snap.get("error"):
        text += f"\n\n**Error:** {for_the_ui(snap['error'])}"
    if snap.get("lora_path"):
        text += f"\n\nLoRA: `{snap['lora_path']}`"
    return text


def loss_table(snap: dict[str, Any], max_points: int = PLOT_POINTS):
    """Raw and smoothed loss, and the validation loss when there is one, as a long table for gr.LinePlot, thinned to
    at most max_points per series."""
    import pandas as pd

    steps = [s for s, _ in snap["losses"]]
    raw = [v for _, v in snap["losses"]]
    smoothed = smooth(raw)
    stride = max(1, -(-len(steps) // max_points))
    keep = list(range(0, len(steps), stride))
    if keep and keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)
    val = list(snap.get("val_losses") or [])
    val = val[:: max(1, -(-len(val) // max_points))] + ([val[-1]] if len(val) > max_points else [])
    # Typed columns even when empty: the plot takes its axis types from the first frame it sees.
    return pd.DataFrame({
        "step": pd.Series([steps[i] for i in keep] * 2 + [s for s, _ in val], dtype="int64"),
        "loss": pd.Series([raw[i] for i in keep] + [smoothed[i] for i in keep] + [v for _, v in val], dtype="float64"),
        "series": pd.Series(["raw"] * len(keep) + ["smoothed"] * len(keep) + ["validation"] * len(val), dtype="str"),
    })
