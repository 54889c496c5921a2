"""Model & LoRA tab: base model, rank/alpha with the effective scale, target layers with a live parameter count."""

from __future__ import annotations

import gradio as gr

from .common import user_message
from .fields import LAYER_CHOICES, layers_to_targets, CONV_GROUP


def build(service, ctx: dict, defaults: dict) -> None:
    f = ctx["fields"]
    with gr.Row():
        f["base_model"] = gr.Textbox(label="Base model", value=defaults["base_model"], scale=3, elem_id="base-model",
                                     info="builtin:tiny, a diffusers folder, an SD1.x/SD2.x .safetensors file, or a hub id")
        f["prediction_type"] = gr.Dropdown(["auto", "epsilon", "v_prediction"], value=defaults["prediction_type"], label="Prediction type")
    with gr.Row():
        f["rank"] = gr.Number(label="Rank", value=defaults["rank"], precision=0, minimum=1, elem_id="rank")
        f["alpha"] = gr.Number(label="Alpha", value=defaults["alpha"], minimum=0.0001, elem_id="alpha")
        scale = gr.Markdown(elem_id="lora-scale")
    f["layers"] = gr.CheckboxGroup(LAYER_CHOICES, value=defaults["layers"], label="UNet layers to adapt", elem_id="layers")
    with gr.Row():
        f["conv_rank"] = gr.Number(label="Conv rank (when conv 3x3 is on)", value=defaults["conv_rank"], precision=0, minimum=0)
        f["conv_alpha"] = gr.Number(label="Conv alpha", value=defaults["conv_alpha"], minimum=0.0001)
    with gr.Row():
        f["train_text_encoder"] = gr.Checkbox(label="Train text-encoder LoRA", value=defaults["train_text_encoder"], elem_id="train-te")
        f["text_encoder_lr"] = gr.Number(label="Text-encoder LR (0 = same as UNet LR)", value=defaults["text_encoder_lr"])
    params = gr.Markdown(elem_id="param-count")

    def show_scale(rank, alpha):
        try:
            return f"Effective scale alpha/rank = **{float(alpha) / float(rank):.3g}**"
        except (TypeError, ValueError, ZeroDivisionError):
            return "Effective scale: rank must be at least 1"

    def show_params(spec, layers, rank, conv_rank, train_te):
        try:
            targets = layers_to_targets(layers)
            conv = int(conv_rank or 0) if CONV_GROUP in (layers or []) else 0
            if not targets and not conv:
                return "Choose at least one layer group."
            n, nu, nt = service.count_parameters(spec, targets, int(rank or 1), conv, bool(train_te))
            return f"Trainable parameters: **{n:,}** ({nu} UNet modules, {nt} text-encoder modules)"
        except Exception as exc:  # noqa: BLE001 - shown next to the widgets
            return f"⚠️ {user_message(exc)}"

    count_inputs = [f["base_model"], f["layers"], f["rank"], f["conv_rank"], f["train_text_encoder"]]
    for comp in (f["rank"], f["alpha"]):
        comp.change(show_scale, [f["rank"], f["alpha"]], scale)
    for comp in count_inputs:
        comp.change(show_params, count_inputs, params)
    ctx["on_load"].append((show_scale, [f["rank"], f["alpha"]], scale))
    ctx["on_load"].append((show_params, count_inputs, params))
