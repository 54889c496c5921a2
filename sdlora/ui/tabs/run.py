"""Run tab: start/stop/resume, progress, live loss plot, previews, log tail and the job queue.

The page polls the server's one job queue (gr.Timer), so a reloaded or reopened page shows the running job again.
Outputs that did not change since the last poll are skipped, so an idle page costs almost nothing.
"""

from __future__ import annotations

import time

import gradio as gr

from ..common import guard, log
from ..fields import form_to_config
from ..services.progress import loss_table, progress_text

LOG_LINES = 14
# Seconds between polls, and between loss-plot updates while a job runs: drawing the plot and the page on every
# one-second poll took CPU from training (bench/page_speed.py: 9.3 it/s from the page against 13.7 from the CLI).
POLL_EVERY = 2.0
PLOT_EVERY = 15.0


def _previews(snap) -> list:
    return [(path, f"step {step}: {prompt[:48]}") for step, path, prompt in reversed(snap["samples"])]


def _queue_rows(snap) -> list:
    return [[j["id"], j["state"] + (" (resume)" if j["resume"] else ""), j["output_name"], j["step"], j["total_steps"]]
            for j in reversed(snap["queue"])]


def build(services, ctx: dict) -> None:
    with gr.Row():
        start = gr.Button("▶ Start training", variant="primary", elem_id="start-btn")
        stop = gr.Button("■ Stop (saves a checkpoint)", variant="stop", elem_id="stop-btn")
        resume = gr.Button("↻ Resume from last checkpoint", elem_id="resume-btn")
    with gr.Row():
        check = gr.Button("Check steps and memory", elem_id="check-run-btn", scale=1)
        preview = gr.Markdown("", elem_id="run-preview")
    progress = gr.Markdown("No training job yet. Press **Start training**.", elem_id="progress")
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", color="series", title="Training loss (raw, smoothed, validation)", height=300,
                           elem_id="loss-plot", x_title="step", y_title="loss",
                           color_map={"raw": "#9db4d6", "smoothed": "#e4572e", "validation": "#2a9d3f"})
        previews = gr.Gallery(label="Previews (newest first)", columns=3, height=300, elem_id="previews", object_fit="contain",
                              preview=False)
    with gr.Row():
        log_box = gr.Textbox(label="Log (latest lines)", lines=LOG_LINES, max_lines=LOG_LINES, interactive=False,
                             elem_id="log", scale=3)
        queue = gr.Dataframe(headers=["job", "state", "name", "step", "of"], label="Job queue", interactive=False,
                             elem_id="queue", scale=2)
    timer = gr.Timer(POLL_EVERY)
    seen = gr.State({})  # what this page shows, per output, so a poll sends only what changed

    inputs = [ctx["fields"][k] for k in ctx["field_keys"]]

    def refresh(last: dict | None = None):
        try:
            snap = services.jobs.status()
        except Exception:  # noqa: BLE001 - polling must never break the page
            log.exception("status poll failed")
            return [gr.skip()] * 6
        last = dict(last or {})
        shown, now = dict(last), time.monotonic()
        values = []
        for key, sig, make in (
            ("progress", (snap["id"], snap["state"], snap["step"], snap["error"], snap.get("lora_path"), snap.get("plan"),
                          [j["state"] for j in snap["queue"]]), lambda: progress_text(snap)),
            ("plot", (snap["id"], snap["state"], len(snap["losses"]), len(snap.get("val_losses") or [])),
             lambda: loss_table(snap) if snap["losses"] else None),
            ("previews", (snap["id"], len(snap["samples"])), lambda: _previews(snap)),
            ("log", (snap["id"], len(snap["log"]), snap["log"][-1:]), lambda: "\n".join(snap["log"][-LOG_LINES:])),
            ("queue", [(j["id"], j["state"], j["step"]) for j in snap["queue"]], lambda: _queue_rows(snap)),
        ):
            sig = repr(sig)
            # The plot is the costly one to send and to draw: while a job runs, at most one every PLOT_EVERY seconds.
            throttled = (key == "plot" and snap["state"] == "running" and sig != last.get(key)
                         and now - last.get("plot_at", 0.0) < PLOT_EVERY)
            if sig == last.get(key) or throttled:
                values.append(gr.skip())
                continue
            shown[key] = sig
            if key == "plot":
                shown["plot_at"] = now
            values.append(make())
        return values + [shown]

    @guard
    def do_start(*values):
        job = services.jobs.start(form_to_config(ctx["form_values"](*values)))
        running = services.jobs.queue.current()
        gr.Info(f"Job {job.id} started." if running is job else f"Job {job.id} queued: it starts when job {running.id} ends.")
        return refresh()

    @guard
    def do_resume(*values):
        job = services.jobs.resume(form_to_config(ctx["form_values"](*values)))
        gr.Info(f"Job {job.id} resumes '{job.config.output_name}' from its newest checkpoint.")
        return refresh()

    @guard
    def do_stop():
        if services.jobs.stop():
            gr.Info("Stopping: the job saves a checkpoint and its LoRA, then stops.")
        else:
            gr.Info("No job is running.")
        return refresh()

    outputs = [progress, plot, previews, log_box, queue, seen]
    @guard
    def do_check(*values):
        return services.configs.preview_run(form_to_config(ctx["form_values"](*values)))

    check.click(do_check, inputs, preview, api_visibility="private", concurrency_id="params", concurrency_limit=1)
    start.click(do_start, inputs, outputs, api_visibility="private", concurrency_limit=None)
    resume.click(do_resume, inputs, outputs, api_visibility="private", concurrency_limit=None)
    stop.click(do_stop, None, outputs, api_visibility="private", concurrency_limit=None)
    # Polls skip the queue: they are cheap, and must not wait behind a long generate or export.
    timer.tick(refresh, seen, outputs, show_progress="hidden", api_visibility="private", queue=False)
    ctx["on_load"].append((refresh, seen, outputs))
