"""Training tab: every optimisation, data and preview setting, presets to load and save, validation."""

from __future__ import annotations

import gradio as gr

from .common import guard, user_message
from .fields import config_to_form, form_to_config


def build(service, ctx: dict, defaults: dict) -> None:
    f = ctx["fields"]
    with gr.Row():
        preset = gr.Dropdown(service.list_presets(), value="demo" if "demo" in service.list_presets() else None, label="Preset",
                             elem_id="preset")
        load_btn = gr.Button("Load preset")
        preset_name = gr.Textbox(label="Save current settings as", placeholder="my-preset")
        save_btn = gr.Button("Save preset")
    with gr.Row():
        f["length_mode"] = gr.Radio(["steps", "epochs"], value=defaults["length_mode"], label="Train for")
        f["length"] = gr.Number(label="Steps / epochs", value=defaults["length"], precision=0, minimum=1, elem_id="length")
        f["batch_size"] = gr.Number(label="Batch size", value=defaults["batch_size"], precision=0, minimum=1)
        f["grad_accum"] = gr.Number(label="Gradient accumulation", value=defaults["grad_accum"], precision=0, minimum=1)
    with gr.Row():
        f["lr"] = gr.Number(label="Learning rate", value=defaults["lr"], elem_id="lr")
        f["lr_scheduler"] = gr.Dropdown(["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
                                        value=defaults["lr_scheduler"], label="LR scheduler")
        f["warmup_steps"] = gr.Number(label="Warm-up steps", value=defaults["warmup_steps"], precision=0, minimum=0)
        f["optimizer"] = gr.Dropdown(["adamw", "adamw8bit", "prodigy"], value=defaults["optimizer"], label="Optimizer")
    with gr.Row():
        f["resolution"] = gr.Number(label="Resolution", value=defaults["resolution"], precision=0, elem_id="resolution")
        f["mixed_precision"] = gr.Dropdown(["no", "bf16", "fp16"], value=defaults["mixed_precision"], label="Mixed precision")
        f["gradient_checkpointing"] = gr.Checkbox(label="Gradient checkpointing", value=defaults["gradient_checkpointing"])
        f["seed"] = gr.Number(label="Seed", value=defaults["seed"], precision=0)
    with gr.Row():
        f["min_snr_gamma"] = gr.Number(label="Min-SNR gamma (0 = off)", value=defaults["min_snr_gamma"])
        f["noise_offset"] = gr.Number(label="Noise offset", value=defaults["noise_offset"], minimum=0)
        f["enable_buckets"] = gr.Checkbox(label="Aspect-ratio buckets", value=defaults["enable_buckets"])
        f["random_flip"] = gr.Checkbox(label="Random flip", value=defaults["random_flip"])
    with gr.Row():
        f["trigger_word"] = gr.Textbox(label="Trigger word", value=defaults["trigger_word"], elem_id="trigger-word")
        f["shuffle_tags"] = gr.Checkbox(label="Shuffle tags", value=defaults["shuffle_tags"])
        f["keep_tokens"] = gr.Number(label="Keep first N tags", value=defaults["keep_tokens"], precision=0, minimum=0)
        f["caption_dropout"] = gr.Number(label="Caption dropout", value=defaults["caption_dropout"], minimum=0, maximum=0.99)
    f["sample_prompts_text"] = gr.Textbox(label="Sample prompts (one per line; --n --w --h --d --l --s options)", lines=3,
                                          value=defaults["sample_prompts_text"], elem_id="sample-prompts")
    with gr.Row():
        f["sample_every"] = gr.Number(label="Preview every N steps", value=defaults["sample_every"], precision=0, minimum=0, elem_id="sample-every")
        f["sample_steps"] = gr.Number(label="Preview sampling steps", value=defaults["sample_steps"], precision=0, minimum=1, elem_id="sample-steps")
        f["save_every"] = gr.Number(label="Checkpoint every N steps", value=defaults["save_every"], precision=0, minimum=0)
        f["output_name"] = gr.Textbox(label="Output name", value=defaults["output_name"], elem_id="output-name")
    with gr.Row():
        f["save_precision"] = gr.Dropdown(["fp16", "bf16", "fp32"], value=defaults["save_precision"], label="Save precision")
        f["format"] = gr.Dropdown(["kohya", "diffusers"], value=defaults["format"], label="Export format")
    check = gr.Markdown(elem_id="config-check")

    keys = list(f)
    ctx["field_keys"] = keys

    def form_values(*values):
        form = dict(zip(ctx["field_keys"], values))
        form["data_dir"] = form.pop("data_dir", None) or "builtin:demo"
        return form

    ctx["form_values"] = form_values

    def validate(*values):
        try:
            service.build_config(form_to_config(form_values(*values)))
            return "✅ Settings are valid."
        except Exception as exc:  # noqa: BLE001
            return f"⚠️ {user_message(exc)}"

    @guard
    def do_load(name, *current):
        if not name:
            raise gr.Error("Pick a preset first.")
        form = config_to_form(service.load_preset(name))
        out = []
        for key, value in zip(ctx["field_keys"], current):
            out.append(value if key in ("data_dir", "base_model") else form.get(key, value))
        gr.Info(f"Loaded preset {name}.")
        return out

    @guard
    def do_save(name, *values):
        path = service.save_preset(name, form_to_config(form_values(*values)))
        gr.Info(f"Saved {path.name}.")
        return gr.update(choices=service.list_presets(), value=path.stem)

    ctx["validate"] = validate
    ctx["check"] = check
    ctx["preset_io"] = (preset, load_btn, preset_name, save_btn, do_load, do_save)
