"""The training settings as form values and back: one place that maps widgets to TrainConfig fields."""

from __future__ import annotations

import math
from typing import Any

from ..adapters.rules import needs_conv_layers
from ..adapters.targets import LAYER_GROUPS, SHORTHAND_GROUP_NAMES
from ..config.train_config import ConfigError

CONV_GROUP = "conv 3x3 (ResNet)"
LAYER_CHOICES = list(LAYER_GROUPS) + [CONV_GROUP]
# Form-only keys: form_to_config turns them into config fields.
FORM_ONLY = ("layers", "sample_prompts_text", "length_mode", "length")
INT_FIELDS = ("rank", "conv_rank", "batch_size", "grad_accum", "resolution", "seed", "warmup_steps", "keep_tokens",
              "sample_every", "save_every", "sample_steps", "validate_every", "lokr_factor", "clip_skip",
              "multires_noise_iterations")
FLOAT_FIELDS = ("alpha", "conv_alpha", "lr", "noise_offset", "caption_dropout", "prior_loss_weight", "validation_split",
                "rank_dropout", "module_dropout", "dropout", "huber_c", "multires_noise_discount", "ip_noise_gamma",
                "caption_tag_dropout_rate")
# Settings whose unset value the form shows as a number: (field, the number that means unset).
UNSET_AS = {"min_timestep": 0, "max_timestep": 1000, "scale_weight_norms": 0}

def layers_to_targets(layers: list[str] | None) -> list[str]:
    targets: list[str] = []
    for label in layers or []:
        targets += LAYER_GROUPS.get(label, [])
    return targets


def targets_to_layers(targets: list[str], conv_rank: int) -> list[str]:
    expanded: set[str] = set()
    for t in targets or []:
        expanded |= SHORTHAND_GROUP_NAMES.get(t, {t})
    chosen = [label for label, names in LAYER_GROUPS.items() if set(names) <= expanded]
    if conv_rank:
        chosen.append(CONV_GROUP)
    return chosen


def _number(form: dict[str, Any], key: str, kind):
    value = form.get(key)
    if value is None or value == "":
        raise ConfigError(f"{key}: enter a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: '{value}' is not a number.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: '{value}' is not a finite number.")
    if kind is int:
        if number != int(number):
            raise ConfigError(f"{key}: use a whole number (got {value}).")
        return int(number)
    return number


def _text_encoder_lr(value) -> float | list[float] | None:
    """The text-encoder LR field: one number, or two for SDXL's encoders ("3e-5, 1e-5"); 0 or empty = the UNet's LR."""
    if isinstance(value, (int, float)):
        return float(value) or None
    parts = [p for p in str(value or "").replace(";", ",").split(",") if p.strip()]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"text_encoder_lr: '{value}' is not a number, or two numbers separated by a comma "
                          "(SDXL: one per text encoder).") from None
    if not numbers or not any(numbers):
        return None
    return numbers[0] if len(numbers) == 1 else numbers


def form_to_config(form: dict[str, Any]) -> dict[str, Any]:
    """Form values -> TrainConfig fields (still to be validated by make_config)."""
    values = {k: v for k, v in form.items() if k not in FORM_ONLY}
    layers = form.get("layers") or []
    values["targets"] = layers_to_targets(layers)
    if CONV_GROUP not in layers:
        values["conv_rank"] = 0
        if needs_conv_layers(form.get("network")):
            raise ConfigError(f"Adapter type: locon adapts the ResNet blocks; tick '{CONV_GROUP}' under UNet layers to "
                              "adapt, or choose lora.")
    elif "conv_rank" in form:
        if _number(form, "conv_rank", int) < 1:
            raise ConfigError("conv_rank: 'conv 3x3' is ticked, so its rank must be at least 1.")
        if not values["targets"]:
            raise ConfigError("targets: tick at least one attention/projection/feed-forward group as well as conv 3x3.")
    values["sample_prompts"] = [line.strip() for line in (form.get("sample_prompts_text") or "").splitlines() if line.strip()]
    if "length" in form:
        length = _number(form, "length", int)
        if form.get("length_mode") == "epochs":
            values["epochs"], values["steps"] = length, None
        else:
            values["steps"], values["epochs"] = length, None
    for key in INT_FIELDS:
        if key in values:
            values[key] = _number(values, key, int)
    for key in FLOAT_FIELDS:
        if key in values:
            values[key] = _number(values, key, float)
    for key, unset in UNSET_AS.items():
        if key in values:
            number = values[key] if values[key] in (None, "") else _number(values, key, int if key != "scale_weight_norms" else float)
            values[key] = None if number in (None, "", unset) else number
    values["text_encoder_lr"] = _text_encoder_lr(values.get("text_encoder_lr")) if values.get("train_text_encoder") else None
    gamma = values.get("min_snr_gamma")
    values["min_snr_gamma"] = float(gamma) if gamma else None
    if "loraplus_lr_ratio" in values:
        ratio = values["loraplus_lr_ratio"]
        values["loraplus_lr_ratio"] = _number(values, "loraplus_lr_ratio", float) if ratio not in (None, "", 0, 0.0) else None
    for key in ("data_dir", "base_model", "output_name", "trigger_word", "default_caption", "reg_data_dir", "dataset_config",
                "validation_dir", "mask_dir"):
        if isinstance(values.get(key), str):
            values[key] = values[key].strip()
    return values


def config_to_form(cfg: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields -> form values."""
    form = dict(cfg)
    form["layers"] = targets_to_layers(cfg.get("targets", []), cfg.get("conv_rank", 0))
    form["sample_prompts_text"] = "\n".join(cfg.get("sample_prompts") or [])
    if cfg.get("epochs") and not cfg.get("steps"):
        form["length_mode"], form["length"] = "epochs", cfg["epochs"]
    else:
        form["length_mode"], form["length"] = "steps", cfg.get("steps") or 500
    te_lr = cfg.get("text_encoder_lr")
    form["text_encoder_lr"] = ", ".join(f"{v:g}" for v in te_lr) if isinstance(te_lr, list) else f"{te_lr or 0:g}"
    form["min_snr_gamma"] = cfg.get("min_snr_gamma") or 0.0
    form["loraplus_lr_ratio"] = cfg.get("loraplus_lr_ratio") or 0.0
    for key, unset in UNSET_AS.items():
        form[key] = unset if cfg.get(key) is None else cfg[key]
    if not form.get("conv_rank"):
        form["conv_rank"] = 4
    return form
