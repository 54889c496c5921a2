"""Training tab: every optimisation, data and preview setting, presets to load and save, live validation."""

from __future__ import annotations

import gradio as gr

from ...adapters.targets import SHORTHAND_GROUP_NAMES
from ...config.train_config import field_choices
from ..common import guard, user_message
from ..fields import config_to_form, form_to_config, layers_to_targets

FORMAT_LABELS = {"kohya": "kohya (A1111 / Forge / ComfyUI)"}


def build(services, ctx: dict, defaults: dict) -> None:
    f = ctx["fields"]
    presets = services.presets.names()
    with gr.Row(equal_height=True):
        preset = gr.Dropdown(presets, value="demo" if "demo" in presets else None, label="Preset", elem_id="preset", scale=2)
        load_btn = gr.Button("Load preset", elem_id="preset-load", scale=1)
        preset_name = gr.Textbox(label="Save current settings as", placeholder="my-preset", elem_id="preset-name", scale=2)
        save_btn = gr.Button("Save preset", elem_id="preset-save", scale=1)
    gr.Markdown("**Length and optimiser**")
    with gr.Row():
        f["length_mode"] = gr.Radio(["steps", "epochs"], value=defaults["length_mode"], label="Train for", elem_id="length-mode")
        f["length"] = gr.Number(label="Steps / epochs", value=defaults["length"], precision=0, elem_id="length")
        f["batch_size"] = gr.Number(label="Batch size", value=defaults["batch_size"], precision=0, elem_id="batch-size")
        f["grad_accum"] = gr.Number(label="Gradient accumulation", value=defaults["grad_accum"], precision=0,
                                    elem_id="grad-accum")
    with gr.Row():
        f["lr"] = gr.Number(label="Learning rate", value=defaults["lr"], elem_id="lr")
        f["lr_scheduler"] = gr.Dropdown(field_choices("lr_scheduler"), value=defaults["lr_scheduler"], label="LR scheduler", elem_id="lr-scheduler")
        f["warmup_steps"] = gr.Number(label="Warm-up steps", value=defaults["warmup_steps"], precision=0,
                                      elem_id="warmup")
        f["optimizer"] = gr.Dropdown(field_choices("optimizer"), value=defaults["optimizer"], label="Optimizer",
                                     elem_id="optimizer")
    with gr.Row():
        f["resolution"] = gr.Number(label="Resolution", value=defaults["resolution"], precision=0, elem_id="resolution")
        f["mixed_precision"] = gr.Dropdown(field_choices("mixed_precision"), value=defaults["mixed_precision"], label="Mixed precision",
                                           elem_id="precision")
        f["gradient_checkpointing"] = gr.Checkbox(label="Gradient checkpointing (less memory, slower)",
                                                  value=defaults["gradient_checkpointing"], elem_id="grad-ckpt")
        f["seed"] = gr.Number(label="Seed", value=defaults["seed"], precision=0, elem_id="seed")
    with gr.Row():
        f["min_snr_gamma"] = gr.Number(label="Min-SNR gamma (0 = off, 5 is usual)", value=defaults["min_snr_gamma"],
                                       elem_id="min-snr")
        f["noise_offset"] = gr.Number(label="Noise offset", value=defaults["noise_offset"], elem_id="noise-offset")
        f["enable_buckets"] = gr.Checkbox(label="Aspect-ratio buckets", value=defaults["enable_buckets"], elem_id="buckets")
        f["bucket_no_upscale"] = gr.Checkbox(label="Buckets: never upscale small images", value=defaults["bucket_no_upscale"],
                                             elem_id="bucket-no-upscale")
        f["random_flip"] = gr.Checkbox(label="Random horizontal flip", value=defaults["random_flip"], elem_id="flip")
    with gr.Row():
        f["loraplus_lr_ratio"] = gr.Number(label="LoRA+ ratio: up matrices learn at lr x this (0 = off, 16 is usual)",
                                           value=defaults.get("loraplus_lr_ratio") or 0, elem_id="loraplus")
        f["prior_loss_weight"] = gr.Number(label="Regularization images: loss weight (prior_loss_weight)",
                                           value=defaults.get("prior_loss_weight", 1.0), elem_id="prior-loss-weight")
    gr.Markdown("**Validation and masked loss**")
    with gr.Row():
        f["validation_split"] = gr.Number(label="Validation: fraction of images held out (0 = none)",
                                          value=defaults.get("validation_split", 0.0), elem_id="validation-split")
        f["validation_dir"] = gr.Textbox(label="Validation folder (replaces the held-out fraction)",
                                         value=defaults.get("validation_dir", ""), elem_id="validation-dir")
        f["validate_every"] = gr.Number(label="Validation loss every N steps (0 = at the end)",
                                        value=defaults.get("validate_every", 0), precision=0, elem_id="validate-every")
    with gr.Row():
        f["masked_loss"] = gr.Checkbox(label="Masked loss (alpha channel, else mask folder; white = learn)",
                                       value=defaults.get("masked_loss", False), elem_id="masked-loss")
        f["mask_dir"] = gr.Textbox(label="Mask folder (grayscale masks named like the images)",
                                   value=defaults.get("mask_dir", ""), elem_id="mask-dir")
        f["log_with"] = gr.Dropdown(field_choices("log_with"), value=defaults.get("log_with", "none"),
                                    label="Also log to (OUTPUT/logs/tensorboard)", elem_id="log-with")
    gr.Markdown("**Captions** (the trigger word is on the Dataset tab)")
    with gr.Row():
        f["shuffle_tags"] = gr.Checkbox(label="Shuffle tags", value=defaults["shuffle_tags"], elem_id="shuffle-tags")
        f["keep_tokens"] = gr.Number(label="Keep first N tags in place", value=defaults["keep_tokens"], precision=0,
                                     elem_id="keep-tokens")
        f["caption_dropout"] = gr.Number(label="Caption dropout (probability)", value=defaults["caption_dropout"], elem_id="caption-dropout")
        f["default_caption"] = gr.Textbox(label="Caption for images without one", value=defaults["default_caption"],
                                          elem_id="default-caption")
    _advanced(f, defaults)
    gr.Markdown("**Previews, checkpoints, output**")
    f["sample_prompts_text"] = gr.Textbox(label="Sample prompts (one per line; options --n negative --w --h --d seed --l cfg --s steps)",
                                          lines=2, value=defaults["sample_prompts_text"], elem_id="sample-prompts")
    with gr.Row():
        f["sample_every"] = gr.Number(label="Preview every N steps (0 = at the end)", value=defaults["sample_every"], precision=0, elem_id="sample-every")
        f["sample_steps"] = gr.Number(label="Preview sampling steps", value=defaults["sample_steps"], precision=0,
                                      elem_id="sample-steps")
        f["save_every"] = gr.Number(label="Checkpoint every N steps (0 = off)", value=defaults["save_every"], precision=0, elem_id="save-every")
        f["output_name"] = gr.Textbox(label="Output name", value=defaults["output_name"], elem_id="output-name")
    with gr.Row():
        f["save_precision"] = gr.Dropdown(field_choices("save_precision"), value=defaults["save_precision"], label="Save precision",
                                          elem_id="save-precision")
        f["format"] = gr.Dropdown([(FORMAT_LABELS.get(v, v), v) for v in field_choices("format")],
                                  value=defaults["format"], label="LoRA file format", elem_id="format")
    check = gr.Markdown(elem_id="config-check")

    def validate(*values):
        try:
            cfg = services.configs.checked(form_to_config(ctx["form_values"](*values)))
            return f"✔ Settings are valid. Output: `{cfg.output_dir}`"
        except Exception as exc:  # noqa: BLE001 - shown under the form
            return f"⚠️ {user_message(exc)}"

    @guard
    def do_load(name, *current):
        if not name:
            raise gr.Error("Pick a preset first.")
        cfg = services.presets.load(name)
        form = config_to_form(cfg)
        keys = ctx["field_keys"]
        if sorted(layers_to_targets(form["layers"])) != sorted(_expand(cfg.get("targets", []))):
            gr.Warning(f"Preset {name}: its targets {cfg.get('targets')} are shown as the nearest layer groups.")
        gr.Info(f"Loaded preset {name} (dataset and base model kept).")
        return [value if key in ("data_dir", "base_model") else form.get(key, value) for key, value in zip(keys, current)]

    @guard
    def do_save(name, *values):
        path = services.presets.save(name, form_to_config(ctx["form_values"](*values)))
        gr.Info(f"Saved {path}.")
        return gr.update(choices=services.presets.names(), value=path.stem)

    ctx["validate"] = validate
    ctx["check"] = check
    ctx["preset_io"] = (preset, load_btn, preset_name, save_btn, do_load, do_save)


def _advanced(f: dict, defaults: dict) -> None:
    """kohya's loss, noise and text-encoder options, closed by default: every run works without them."""
    def number(key, label, **kw):
        f[key] = gr.Number(label=label, value=defaults.get(key), elem_id=key.replace("_", "-"), **kw)

    with gr.Accordion("Advanced: loss, noise and text encoder (kohya options)", open=False, elem_id="advanced"):
        with gr.Row():
            number("clip_skip", "Clip skip (SD1/SD2; 2 for anime-style models)", precision=0)
            number("min_timestep", "Min timestep", precision=0)
            number("max_timestep", "Max timestep (timesteps drawn below it)", precision=0)
            number("caption_tag_dropout_rate", "Tag dropout (per tag, after keep tokens)")
        with gr.Row():
            f["loss_type"] = gr.Dropdown(field_choices("loss_type"), value=defaults.get("loss_type"), label="Loss type",
                                         elem_id="loss-type")
            number("huber_c", "Huber c (huber / smooth_l1)")
            f["huber_schedule"] = gr.Dropdown(field_choices("huber_schedule"), value=defaults.get("huber_schedule"),
                                              label="Huber schedule", elem_id="huber-schedule")
            number("scale_weight_norms", "Scale weight norms (max norm; 0 = off)")
        with gr.Row():
            number("multires_noise_iterations", "Pyramid noise levels (0 = off)", precision=0)
            number("multires_noise_discount", "Pyramid noise discount")
            number("ip_noise_gamma", "Input perturbation noise (0 = off)")
        with gr.Row():
            f["zero_terminal_snr"] = gr.Checkbox(label="Zero terminal SNR (v-prediction models)",
                                                 value=defaults.get("zero_terminal_snr"), elem_id="zero-terminal-snr")
            f["debiased_estimation_loss"] = gr.Checkbox(label="Debiased estimation loss (1/sqrt(SNR))",
                                                        value=defaults.get("debiased_estimation_loss"),
                                                        elem_id="debiased-estimation")


def _expand(targets: list[str]) -> list[str]:
    out: set[str] = set()
    for t in targets:
        out |= SHORTHAND_GROUP_NAMES.get(t, {t})
    return sorted(out)
