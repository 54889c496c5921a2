"""Model & LoRA tab: base model, rank/alpha with the effective scale, target layers with a live parameter count."""

from __future__ import annotations

import gradio as gr

from ...config.train_config import field_choices
from ..common import user_message
from ..fields import CONV_GROUP, LAYER_CHOICES, layers_to_targets


def show_scale(rank, alpha, conv_rank=None, conv_alpha=None, layers=None) -> str:
    try:
        text = f"Effective scale alpha/rank = **{float(alpha) / float(rank):.3g}**"
    except (TypeError, ValueError, ZeroDivisionError):
        return "Effective scale: rank must be at least 1 and alpha a positive number."
    if layers and CONV_GROUP in layers:
        try:
            text += f" · conv: **{float(conv_alpha) / float(conv_rank):.3g}**"
        except (TypeError, ValueError, ZeroDivisionError):
            text += " · conv: conv rank must be at least 1"
    return text


def parameter_summary(models, spec, layers, rank, conv_rank, train_te, allow_pickle, network, dora, lokr_factor,
                      lokr_full_matrix, tucker) -> str:
    """The live count under the adapter settings: the form's values (the adapter settings that change the count)
    through AdapterSpec.from_config, the constructor training uses."""
    try:
        targets = layers_to_targets(layers)
        conv = int(conv_rank or 0) if CONV_GROUP in (layers or []) else 0
        if not targets and not conv:
            return "⚠️ Choose at least one layer group."
        if int(rank or 0) < 1:
            return "⚠️ Rank must be at least 1."
        from ...adapters.spec import AdapterSpec

        adapter = AdapterSpec.from_config({
            "network": network or "lora", "rank": int(rank), "alpha": float(rank), "conv_rank": conv, "dora": bool(dora),
            "lokr_factor": int(lokr_factor or -1), "lokr_full_matrix": bool(lokr_full_matrix), "tucker": bool(tucker)})
        n, n_unet, n_te = models.count_parameters(spec, targets, int(rank), conv, bool(train_te), bool(allow_pickle),
                                                  adapter=adapter)
        size = n * 2 / 1024
        size_text = f"{size / 1024:.1f} MiB" if size >= 1024 else f"{size:.0f} KiB"
        return (f"Trainable parameters: **{n:,}** ({n_unet} UNet modules, {n_te} text-encoder modules; "
                f"about {size_text} as an fp16 file)")
    except Exception as exc:  # noqa: BLE001 - shown next to the widgets
        return f"⚠️ {user_message(exc)}"


def build(services, ctx: dict, defaults: dict) -> None:
    f = ctx["fields"]
    with gr.Row():
        f["base_model"] = gr.Dropdown(["builtin:toy", "builtin:tiny", "builtin:tiny-xl"], value=defaults["base_model"], label="Base model", scale=4,
                                      allow_custom_value=True, filterable=True, elem_id="base-model",
                                      info="builtin:toy (draws simple shapes) / builtin:tiny / builtin:tiny-xl (offline "
                                           "demos), a diffusers folder, an SD1.x/SD2.x/SDXL .safetensors/.ckpt file, or a hub id such as "
                                           "stabilityai/stable-diffusion-xl-base-1.0")
        ctx["family_info"] = gr.Markdown("", elem_id="model-family")
        f["prediction_type"] = gr.Dropdown(field_choices("prediction_type"), value=defaults["prediction_type"],
                                           label="Prediction type", scale=1)
        trusted = services.access.pickle_from_clients
        f["allow_pickle"] = gr.Checkbox(label="Allow pickle (.ckpt files you trust only)",
                                        value=bool(defaults["allow_pickle"]) and trusted, scale=1, elem_id="allow-pickle",
                                        interactive=trusted,
                                        info=None if trusted else "off: start the server with --allow-pickle-from-clients")
    with gr.Row(equal_height=True):
        f["rank"] = gr.Number(label="Rank", value=defaults["rank"], precision=0, elem_id="rank")
        f["alpha"] = gr.Number(label="Alpha", value=defaults["alpha"], elem_id="alpha")
        scale = gr.Markdown(show_scale(defaults["rank"], defaults["alpha"], defaults["conv_rank"], defaults["conv_alpha"],
                                       defaults["layers"]), elem_id="lora-scale")
    f["layers"] = gr.CheckboxGroup(LAYER_CHOICES, value=defaults["layers"], label="UNet layers to adapt", elem_id="layers")
    with gr.Row():
        f["conv_rank"] = gr.Number(label="Conv 3x3 rank (used when 'conv 3x3' is ticked)", value=defaults["conv_rank"],
                                   precision=0, elem_id="conv-rank")
        f["conv_alpha"] = gr.Number(label="Conv 3x3 alpha", value=defaults["conv_alpha"], elem_id="conv-alpha")
    with gr.Row():
        f["network"] = gr.Dropdown(field_choices("network"), value=defaults["network"], label="Adapter type",
                                   elem_id="network", info="locon: LoRA on the ResNet blocks too (tick conv 3x3); loha: "
                                                           "Hadamard product; lokr: Kronecker product (LyCORIS)")
        f["dora"] = gr.Checkbox(label="DoRA (weight-decomposed)", value=bool(defaults["dora"]), elem_id="dora")
        f["lokr_factor"] = gr.Number(label="LoKr factor (-1 = balanced)", value=defaults["lokr_factor"], precision=0,
                                     elem_id="lokr-factor")
    with gr.Row():
        f["lokr_full_matrix"] = gr.Checkbox(label="LoKr: full second factor", value=bool(defaults["lokr_full_matrix"]),
                                            elem_id="lokr-full-matrix")
        f["tucker"] = gr.Checkbox(label="Tucker cores on 3x3 convs", value=bool(defaults["tucker"]), elem_id="tucker")
        f["dropout"] = gr.Number(label="Dropout (LoRA/LoCon/DoRA)", value=defaults["dropout"], elem_id="dropout")
        f["rank_dropout"] = gr.Number(label="Rank dropout", value=defaults["rank_dropout"], elem_id="rank-dropout")
        f["module_dropout"] = gr.Number(label="Module dropout", value=defaults["module_dropout"], elem_id="module-dropout")
    with gr.Row():
        f["train_text_encoder"] = gr.Checkbox(label="Train a text-encoder LoRA too (SDXL: both encoders)",
                                              value=defaults["train_text_encoder"],
                                              elem_id="train-te")
        f["text_encoder_lr"] = gr.Textbox(label="Text-encoder LR (0 = same as the UNet LR; SDXL: one, or two as 'TE1, TE2')",
                                          value=str(defaults["text_encoder_lr"]), elem_id="te-lr")
    params = gr.Markdown("Trainable parameters: …", elem_id="param-count")

    def show_params(*values):
        return parameter_summary(services.models, *values)

    scale_inputs = [f["rank"], f["alpha"], f["conv_rank"], f["conv_alpha"], f["layers"]]
    # One event for all five fields, queued one at a time: with an event per field, the answers to two quick edits
    # (rank, then alpha) could land in either order and leave the first edit's scale on the page. One event with
    # always_last runs again after the edits with the values the page has then.
    gr.on([comp.change for comp in scale_inputs], show_scale, scale_inputs, scale, show_progress="hidden",
          trigger_mode="always_last", concurrency_limit=1, api_visibility="private")
    count_inputs = [f["base_model"], f["layers"], f["rank"], f["conv_rank"], f["train_text_encoder"], f["allow_pickle"],
                    f["network"], f["dora"], f["lokr_factor"], f["lokr_full_matrix"], f["tucker"]]
    for comp in count_inputs:
        comp.change(show_params, count_inputs, params, show_progress="minimal", trigger_mode="always_last",
                    concurrency_id="params", concurrency_limit=1, api_visibility="private")
    ctx["on_load"].append((show_params, count_inputs, params))
