"""The page: six tabs over one Service, plus named API endpoints for gradio_client."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..config import config_from_preset, make_config
from . import dataset_tab, export_tab, model_tab, run_tab, training_tab, try_tab
from .common import guard
from .fields import config_to_form, form_to_config
from .service import Service

ROOT = Path(__file__).resolve().parents[2]


def demo_defaults(presets_dir: Path) -> dict:
    demo = presets_dir / "demo.toml"
    cfg = config_from_preset(demo) if demo.is_file() else make_config(data_dir="builtin:demo", resolution=64)
    return config_to_form(cfg.model_dump())


def build_app(service: Service) -> gr.Blocks:
    defaults = demo_defaults(service.presets_dir)
    ctx: dict = {"fields": {}, "on_load": []}
    with gr.Blocks(title="sdlora — LoRA trainer") as demo:
        gr.Markdown("# sdlora\nTrain a Stable Diffusion LoRA: dataset → model & LoRA → training → run → try → export. "
                    "The demo (tiny built-in model, generated dataset) is preselected: press **Start** on the Run tab.")
        with gr.Tab("1 · Dataset", elem_id="tab-dataset"):
            dataset_tab.build(service, ctx)
            ctx["fields"]["data_dir"] = ctx["data_dir"]
        with gr.Tab("2 · Model & LoRA", elem_id="tab-model"):
            model_tab.build(service, ctx, defaults)
        with gr.Tab("3 · Training", elem_id="tab-training"):
            training_tab.build(service, ctx, defaults)
        with gr.Tab("4 · Run", elem_id="tab-run"):
            run_tab.build(service, ctx)
        with gr.Tab("5 · Try", elem_id="tab-try") as try_tab_el:
            try_tab.build(service, ctx)
        with gr.Tab("6 · Export", elem_id="tab-export") as export_tab_el:
            export_tab.build(service, ctx)

        inputs = [ctx["fields"][k] for k in ctx["field_keys"]]
        for comp in inputs:
            comp.change(ctx["validate"], inputs, ctx["check"], show_progress="hidden")
        preset, load_btn, preset_name, save_btn, do_load, do_save = ctx["preset_io"]
        load_btn.click(do_load, [preset] + inputs, inputs)
        save_btn.click(do_save, [preset_name] + inputs, preset)

        def latest_choices(current):
            choices = service.list_loras()
            return gr.update(choices=choices, value=current or (choices[0] if choices else None))

        try_tab_el.select(latest_choices, ctx["try_lora"], ctx["try_lora"])
        export_tab_el.select(latest_choices, ctx["export_source"], ctx["export_source"])
        for fn, ins, outs in ctx["on_load"]:
            demo.load(fn, ins, outs)

        @guard
        def train(config_json: str) -> dict:
            """Start (or queue) a training job. config_json: TrainConfig fields as JSON; unset fields take the demo preset's values."""
            values = form_to_config(dict(defaults))
            values.update(json.loads(config_json or "{}"))
            job = service.start(values)
            return {"job_id": job.id, "state": job.state, "output_dir": job.config.output_dir}

        def status() -> dict:
            """The current (or last) job: state, step, losses, samples, log, LoRA path, and the queue."""
            return service.status()

        @guard
        def stop() -> bool:
            """Ask the running job to checkpoint and stop."""
            return service.stop()

        gr.api(train, api_name="train")
        gr.api(status, api_name="status")
        gr.api(stop, api_name="stop")
    return demo


def make_service(output_root: str | Path, presets_dir: str | Path | None = None) -> Service:
    return Service(output_root=Path(output_root), presets_dir=Path(presets_dir) if presets_dir else ROOT / "presets")
