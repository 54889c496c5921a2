"""Run tab: start/stop/resume, progress, live loss plot, previews, log and the job queue. Polls the job queue,
so a reloaded page shows the running job again."""

from __future__ import annotations

import gradio as gr

from .common import guard
from .fields import form_to_config
from .service import progress_text


def build(service, ctx: dict) -> None:
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start-btn")
        stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        resume = gr.Button("Resume from last checkpoint", elem_id="resume-btn")
    progress = gr.Markdown("No training job yet. Press **Start**.", elem_id="progress")
    with gr.Row():
        plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", height=280, elem_id="loss-plot")
        previews = gr.Gallery(label="Previews", columns=4, height=280, elem_id="previews")
    with gr.Row():
        log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, autoscroll=True, elem_id="log")
        queue = gr.Dataframe(headers=["job", "state", "name", "step", "of"], label="Job queue", interactive=False, elem_id="queue")
    timer = gr.Timer(1.0)

    fields = ctx["fields"]
    inputs = [fields[k] for k in ctx["field_keys"]]

    @guard
    def do_start(*values):
        job = service.start(form_to_config(ctx["form_values"](*values)))
        gr.Info(f"Job {job.id} queued." if service.queue.current() is not job else f"Job {job.id} started.")
        return refresh()

    @guard
    def do_resume(*values):
        job = service.resume(form_to_config(ctx["form_values"](*values)))
        gr.Info(f"Job {job.id} resumes from the last checkpoint.")
        return refresh()

    @guard
    def do_stop():
        if service.stop():
            gr.Info("Stopping: the job saves a checkpoint and its LoRA, then stops.")
        else:
            gr.Info("No job is running.")
        return refresh()

    def refresh():
        snap = service.status()
        samples = [(path, f"step {step}: {prompt[:40]}") for step, path, prompt in reversed(snap["samples"])]
        rows = [[j["id"], j["state"], j["output_name"], j["step"], j["total_steps"]] for j in snap["queue"]]
        return (progress_text(snap), service.loss_table(snap), samples, "\n".join(snap["log"][-60:]), rows)

    outputs = [progress, plot, previews, log, queue]
    start.click(do_start, inputs, outputs)
    resume.click(do_resume, inputs, outputs)
    stop.click(do_stop, None, outputs)
    timer.tick(refresh, None, outputs, show_progress="hidden")
    ctx["on_load"].append((refresh, None, outputs))
