"""The page: seven tabs over one Services, plus named API endpoints for gradio_client (train, status, stop, generate,
strength_grid, export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from ..config.train_config import config_from_preset, make_config
from ..families import native_resolutions
from .tabs import dataset as dataset_tab, export as export_tab, model as model_tab, run as run_tab
from .tabs import training as training_tab, tryout as try_tab
from .tabs import tools as tools_tab
from .common import guard, user_message
from .fields import LAYER_CHOICES, config_to_form, form_to_config
from .services import Services

ROOT = Path(__file__).resolve().parents[2]
CSS = """
#progress { min-height: 3em; }
#param-count, #lora-scale, #config-check { padding: 4px 0; }
#previews .grid-container { --grid-cols: 3 !important; }
#data-gallery .grid-container { --grid-cols: 6 !important; }
#caption-image img { min-height: 160px !important; width: auto !important; object-fit: contain !important; }
#try-image img { min-height: 256px !important; width: auto !important; object-fit: contain !important; }
#grid-image img { min-height: 160px !important; width: auto !important; object-fit: contain !important; }
"""
INTRO = ("# sdlora — Stable Diffusion LoRA trainer\n"
         "**1** pick images → **2** base model and LoRA shape → **3** training settings → **4** run and watch → "
         "**5** try it at different strengths → **6** export one `.safetensors` file for AUTOMATIC1111 / Forge / ComfyUI / "
         "diffusers. The offline demo (builtin:toy learns the mascot from a generated dataset) is preselected: open **4 · Run** and press "
         "**Start training**.")


def demo_defaults(presets_dir: Path) -> dict[str, Any]:
    """The form's first values: demo.toml from the server's presets folder, so a fresh page trains the offline demo as
    is; the shipped presets/demo.toml when that one is missing or broken (one definition of the demo); the plain
    defaults on builtin:toy when both are."""
    for demo in dict.fromkeys([Path(presets_dir) / "demo.toml", ROOT / "presets" / "demo.toml"]):
        try:
            return config_to_form(config_from_preset(demo).model_dump())
        except Exception:  # noqa: BLE001 - a broken or missing demo preset must not stop the UI
            continue
    return config_to_form(make_config(base_model="builtin:toy", data_dir="builtin:demo", resolution=64).model_dump())


def build_app(services: Services) -> gr.Blocks:
    defaults = demo_defaults(services.presets_dir)
    ctx: dict[str, Any] = {"fields": {}, "on_load": []}
    with gr.Blocks(title="sdlora — LoRA trainer", analytics_enabled=False) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("1 · Dataset", elem_id="tab-dataset"):
                dataset_tab.build(services, ctx, defaults)
            with gr.Tab("2 · Model & LoRA", elem_id="tab-model"):
                model_tab.build(services, ctx, defaults)
            with gr.Tab("3 · Training", elem_id="tab-training"):
                training_tab.build(services, ctx, defaults)
            ctx["field_keys"] = list(ctx["fields"])

            def form_values(*values) -> dict[str, Any]:
                return dict(zip(ctx["field_keys"], values))

            ctx["form_values"] = form_values
            with gr.Tab("4 · Run", elem_id="tab-run"):
                run_tab.build(services, ctx)
            with gr.Tab("5 · Try", elem_id="tab-try") as try_tab_el:
                try_tab.build(services, ctx, defaults)
            with gr.Tab("6 · Export", elem_id="tab-export") as export_tab_el:
                export_tab.build(services, ctx, defaults)
            with gr.Tab("7 · Tools", elem_id="tab-tools") as tools_tab_el:
                tools_tab.build(services, ctx, defaults)

        keys = ctx["field_keys"]
        inputs = [ctx["fields"][k] for k in keys]
        # The form is kept in the browser (localStorage, for as long as this server runs), so a reloaded page shows
        # the settings it had, next to the job it re-attaches to.
        saved = gr.BrowserState({}, storage_key="sdlora-form")

        def check_and_remember(*values):
            return ctx["validate"](*values), dict(zip(keys, values))

        def restore(form):
            if not isinstance(form, dict) or not form:
                return [gr.skip()] * len(keys)
            out = []
            for key in keys:
                value = form.get(key)
                if key == "layers" and isinstance(value, list):
                    value = [v for v in value if v in LAYER_CHOICES]
                out.append(gr.skip() if value is None else value)
            return out

        for comp in inputs:
            comp.change(check_and_remember, inputs, [ctx["check"], saved], show_progress="hidden", trigger_mode="always_last",
                        queue=False, api_visibility="private")
        preset, load_btn, preset_name, save_btn, do_load, do_save = ctx["preset_io"]
        load_btn.click(do_load, [preset] + inputs, inputs, api_visibility="private")
        save_btn.click(do_save, [preset_name] + inputs, preset, api_visibility="private")

        def try_choices(current):
            choices = services.loras.list_loras()
            last = services.jobs.status().get("lora_path") or ""
            return gr.update(choices=choices, value=current or last or (choices[0] if choices else ""))

        def export_choices(current):
            choices = services.loras.list_export_sources()
            value = current or services.jobs.status().get("lora_path") or (choices[0] if choices else "")
            return gr.update(choices=choices, value=value)

        native_sizes = {64, *native_resolutions()}  # the built-in models' and every family's default

        def show_family(spec, resolution, allow_pickle):
            """Family and native resolution next to the base model; a resolution still at some family's default follows
            the new model's (a size the user typed stays)."""
            try:
                info = services.models.model_info(spec, allow_pickle=bool(allow_pickle))
            except Exception as exc:  # noqa: BLE001 - shown next to the field
                return f"⚠️ {user_message(exc)}", gr.skip()
            native = info["resolution"]
            follow = resolution in native_sizes and int(resolution) != native
            return f"**{info['label']}** · native resolution {native} px", (native if follow else gr.skip())

        fam_inputs = [ctx["fields"]["base_model"], ctx["fields"]["resolution"], ctx["fields"]["allow_pickle"]]
        fam_outputs = [ctx["family_info"], ctx["fields"]["resolution"]]
        ctx["fields"]["base_model"].change(show_family, fam_inputs, fam_outputs, api_visibility="private",
                                           show_progress="minimal", trigger_mode="always_last")
        ctx["on_load"].append((show_family, fam_inputs, fam_outputs))
        def lora_choices(current):  # the list refreshed, the choice kept
            return gr.update(choices=services.loras.list_loras(), value=current)

        try_tab_el.select(try_choices, ctx["try_lora"], ctx["try_lora"], api_visibility="private", queue=False)
        try_tab_el.select(lora_choices, ctx["try_add_lora"], ctx["try_add_lora"], api_visibility="private", queue=False)
        export_tab_el.select(export_choices, ctx["export_source"], ctx["export_source"], api_visibility="private", queue=False)
        tools_tab_el.select(lora_choices, ctx["tools_source"], ctx["tools_source"], api_visibility="private", queue=False)
        restored = demo.load(restore, saved, inputs, api_visibility="private", show_progress="hidden", queue=False)
        for fn, ins, outs in ctx["on_load"]:
            restored.then(fn, ins, outs, api_visibility="private", show_progress="hidden")
        restored.then(ctx["validate"], inputs, ctx["check"], api_visibility="private", show_progress="hidden", queue=False)

        @guard
        def train(config: dict) -> dict:
            """Start a training job, or queue it behind the running one. `config`: TrainConfig fields as a dict (or a
            JSON string); fields left out take the demo preset's values. The output folder is always
            OUTPUT_ROOT/output_name. Returns job_id, state and output_dir."""
            values = form_to_config(dict(defaults))
            try:
                given = json.loads(config or "{}") if isinstance(config, str) else dict(config or {})
            except (ValueError, TypeError) as exc:
                raise gr.Error(f"config is not a JSON object of TrainConfig fields ({exc}).") from None
            if not isinstance(given, dict):
                raise gr.Error("config must be an object of TrainConfig fields, e.g. {\"data_dir\": \"/data\", \"steps\": 500}.")
            if "epochs" in given and "steps" not in given:
                values["steps"] = None
            values.update(given)
            job = services.jobs.start(values)
            return {"job_id": job.id, "state": job.state, "output_dir": job.config.output_dir,
                    "output_name": job.config.output_name}

        @guard
        def status(job_id: int = 0) -> dict:
            """A job's snapshot: state (queued/running/done/stopped/failed), step, total_steps, losses [[step, loss]],
            samples [[step, path, prompt]], checkpoints, log, error, lora_path, it_per_s, eta_s, and the whole queue.
            job_id 0 = the running job, else the newest one."""
            if job_id:
                job = services.jobs.queue.get(int(job_id))
                if job is None:
                    raise gr.Error(f"No job {job_id}.")
                snap = services.jobs.status()
                return dict(job.snapshot(), queue=snap["queue"])
            return services.jobs.status()

        @guard
        def stop() -> bool:
            """Ask the running job to save a checkpoint and its LoRA, then stop. False if nothing was running."""
            return services.jobs.stop()

        gr.api(train, api_name="train", concurrency_limit=None)
        gr.api(status, api_name="status", concurrency_limit=None)
        gr.api(stop, api_name="stop", concurrency_limit=None)
    return demo


def make_service(output_root: str | Path, presets_dir: str | Path | None = None, *, data_roots=(), model_roots=(),
                 pickle_from_clients: bool = False) -> Services:
    """The server's Services. data_roots / model_roots / pickle_from_clients are app.py's --data-root, --model-root and
    --allow-pickle-from-clients: what clients may use beyond the output root, builtin:demo and builtin:tiny."""
    return Services(Path(output_root), Path(presets_dir) if presets_dir else ROOT / "presets", data_roots=data_roots,
                    model_roots=model_roots, pickle_from_clients=pickle_from_clients)
