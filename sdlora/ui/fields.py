"""The training settings as form values and back: one place that maps widgets to TrainConfig fields."""

from __future__ import annotations

from typing import Any

from ..lora import LAYER_GROUPS

CONV_GROUP = "conv 3x3 (ResNet)"
LAYER_CHOICES = list(LAYER_GROUPS) + [CONV_GROUP]
# Form-only keys: they are turned into config fields by form_to_config.
FORM_ONLY = ("layers", "sample_prompts_text", "length_mode", "length")


def layers_to_targets(layers: list[str]) -> list[str]:
    targets: list[str] = []
    for label in layers or []:
        targets += LAYER_GROUPS.get(label, [])
    return targets


def targets_to_layers(targets: list[str], conv_rank: int) -> list[str]:
    chosen = []
    expanded = set()
    for t in targets:
        expanded |= {"attn1", "attn2"} if t == "attn" else {t}
        if t == "transformer":
            expanded |= {"attn1", "attn2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"}
    for label, names in LAYER_GROUPS.items():
        if set(names) <= expanded:
            chosen.append(label)
    if conv_rank:
        chosen.append(CONV_GROUP)
    return chosen


def form_to_config(form: dict[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in form.items() if k not in FORM_ONLY}
    layers = form.get("layers") or []
    values["targets"] = layers_to_targets(layers)
    if CONV_GROUP not in layers:
        values["conv_rank"] = 0
    if not values["targets"]:
        values["targets"] = []  # the config refuses an empty list with a clear message
    values["sample_prompts"] = [l.strip() for l in (form.get("sample_prompts_text") or "").splitlines() if l.strip()]
    if form.get("length_mode") == "epochs":
        values["epochs"], values["steps"] = int(form["length"]), None
    else:
        values["steps"], values["epochs"] = int(form["length"]), None
    if not values.get("train_text_encoder"):
        values["text_encoder_lr"] = None
    elif not values.get("text_encoder_lr"):
        values["text_encoder_lr"] = None
    if values.get("min_snr_gamma") in (0, 0.0, None, ""):
        values["min_snr_gamma"] = None
    for key in ("rank", "conv_rank", "batch_size", "grad_accum", "resolution", "seed", "warmup_steps", "keep_tokens",
                "sample_every", "save_every", "sample_steps"):
        if key in values and values[key] is not None:
            values[key] = int(values[key])
    return values


def config_to_form(cfg: dict[str, Any]) -> dict[str, Any]:
    form = dict(cfg)
    form["layers"] = targets_to_layers(cfg.get("targets", []), cfg.get("conv_rank", 0))
    form["sample_prompts_text"] = "\n".join(cfg.get("sample_prompts") or [])
    if cfg.get("epochs") and not cfg.get("steps"):
        form["length_mode"], form["length"] = "epochs", cfg["epochs"]
    else:
        form["length_mode"], form["length"] = "steps", cfg.get("steps") or 500
    form["text_encoder_lr"] = cfg.get("text_encoder_lr") or 0.0
    form["min_snr_gamma"] = cfg.get("min_snr_gamma") or 0.0
    if not form.get("conv_rank"):
        form["conv_rank"] = 4
    return form
