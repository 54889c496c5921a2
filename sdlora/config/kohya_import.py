"""Import a kohya_ss GUI LoRA config (the .json its Save button writes) as a TrainConfig / TOML preset.

Every setting sdlora has is carried over; every key it does not carry is reported by name, split into the ones the
file actually sets (they would change a kohya run) and the ones at an empty/off value (no effect either way).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .train_config import ConfigError, TrainConfig, format_validation_error
from ..safetext import shown

_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy"}
_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
_LOCON_TYPES = ("Kohya LoCon", "LyCORIS/LoCon", "LoCon")
_STANDARD_TYPES = ("Standard", "", None)
# Keys whose meaning sdlora covers without a setting of its own (the model family is detected from the model).
_IMPLIED = {"v2", "sdxl", "sdxl_checkbox", "model_list", "save_model_as", "train_on_input", "noise_offset_type"}


class KohyaImportError(ConfigError):
    """A kohya_ss file that cannot be imported; the message names the file and the key."""


@dataclass
class ImportResult:
    config: TrainConfig
    source: Path
    carried: dict[str, str] = field(default_factory=dict)  # kohya key -> sdlora setting
    not_carried: dict[str, Any] = field(default_factory=dict)  # set in the file, no sdlora equivalent
    at_default: list[str] = field(default_factory=list)  # empty/off in the file, no sdlora equivalent
    notes: list[str] = field(default_factory=list)

    def report_lines(self) -> list[str]:
        lines = [f"Imported {len(self.carried)} settings from {shown(self.source)}: "
                 + ", ".join(f"{k} -> {v}" for k, v in self.carried.items())]
        if self.not_carried:
            lines.append(f"Not carried over ({len(self.not_carried)}, set in the file; sdlora has no such setting): "
                         + ", ".join(f"{k} = {v!r}" for k, v in self.not_carried.items()))
        if self.at_default:
            lines.append(f"Not carried over ({len(self.at_default)}, empty or off in the file, so without effect): "
                         + ", ".join(self.at_default))
        return lines + self.notes

    def header(self) -> str:
        text = [f"Imported from kohya_ss config {self.source.name} by `python -m sdlora import-kohya`."]
        if self.not_carried:
            text.append("Not carried over: " + ", ".join(self.not_carried))
        text += self.notes
        return "\n".join(text)


def _empty(value) -> bool:
    return value is None or value == "" or value is False or value == 0 or value == [] or value == {}


def import_kohya_json(path) -> ImportResult:
    path = Path(path).expanduser()
    name = f"kohya_ss config '{shown(path)}'"
    try:
        if path.stat().st_size > 4 << 20:
            raise KohyaImportError(f"{name} is larger than 4 MiB: not a kohya_ss settings file.")
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise KohyaImportError(f"{name} not found. Give the .json file kohya_ss's Save button wrote.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KohyaImportError(f"{name} is not valid JSON ({exc}).") from None
    except OSError as exc:
        raise KohyaImportError(f"{name} cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(data, dict):
        raise KohyaImportError(f"{name} is not a JSON object of settings.")
    used: dict[str, str] = {}
    values: dict[str, Any] = {}
    notes: list[str] = []

    def num(key, kind=float):
        value = data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise KohyaImportError(f"{name}: key '{key}' = {value!r} is not a number.") from None
        if not math.isfinite(number):
            raise KohyaImportError(f"{name}: key '{key}' = {value!r} is not a finite number.")
        if kind is int:
            if number != int(number):
                raise KohyaImportError(f"{name}: key '{key}' = {value!r} must be a whole number.")
            return int(number)
        return number

    def put(key, field_name, value):
        used[key] = field_name
        if value is not None:
            values[field_name] = value

    def text(key):
        value = data.get(key)
        return value.strip() if isinstance(value, str) else value

    def flag(key):
        value = data.get(key)
        return value if isinstance(value, bool) else None if value in (None, "") else str(value).lower() in ("true", "1")

    # model, data, output
    put("pretrained_model_name_or_path", "base_model", text("pretrained_model_name_or_path") or None)
    if text("dataset_config"):
        put("dataset_config", "dataset_config", text("dataset_config"))
        if text("train_data_dir"):
            used["train_data_dir"] = "(replaced by dataset_config, as in kohya)"
    else:
        put("train_data_dir", "data_dir", text("train_data_dir") or None)
        used.setdefault("dataset_config", "dataset_config")
    put("reg_data_dir", "reg_data_dir", text("reg_data_dir") or None)
    put("output_dir", "output_dir", text("output_dir") or None)
    put("output_name", "output_name", text("output_name") or None)
    # network
    lora_type = data.get("LoRA_type", "Standard")
    used["LoRA_type"] = "conv_rank (LoCon)" if lora_type in _LOCON_TYPES else "(standard LoRA)"
    if lora_type not in _STANDARD_TYPES + _LOCON_TYPES:
        notes.append(f"LoRA_type '{lora_type}' is not something sdlora trains: the preset trains a standard LoRA "
                     "(with conv layers when conv_dim is set); change it only if that is what you want.")
    put("network_dim", "rank", num("network_dim", int))
    put("network_alpha", "alpha", num("network_alpha"))
    if lora_type in _LOCON_TYPES and (num("conv_dim", int) or 0) > 0:
        put("conv_dim", "conv_rank", num("conv_dim", int))
        put("conv_alpha", "conv_alpha", num("conv_alpha"))
    # learning rates and text encoder
    lr, unet_lr, te_lr = num("learning_rate"), num("unet_lr"), num("text_encoder_lr")
    put("learning_rate", "lr", lr if lr else None)
    if unet_lr:  # kohya: unet_lr, when given, is the UNet's learning rate
        put("unet_lr", "lr", unet_lr)
    else:
        used["unet_lr"] = "lr"
    unet_only = flag("network_train_unet_only")
    train_te = not unet_only and not (te_lr == 0 and data.get("text_encoder_lr") not in (None, ""))
    put("network_train_unet_only", "train_text_encoder", train_te)
    used["text_encoder_lr"] = "text_encoder_lr"
    if train_te and te_lr:
        values["text_encoder_lr"] = te_lr
    put("loraplus_lr_ratio", "loraplus_lr_ratio", num("loraplus_lr_ratio") or None)
    # schedule and length
    sched = text("lr_scheduler")
    if sched in _SCHEDULERS:
        put("lr_scheduler", "lr_scheduler", sched)
    steps, epoch, max_epochs = num("max_train_steps", int), num("epoch", int), num("max_train_epochs", int)
    used.update({"max_train_steps": "steps", "epoch": "epochs", "max_train_epochs": "epochs"})
    if max_epochs:
        values["epochs"], values["steps"] = max_epochs, None
    elif steps:
        values["steps"], values["epochs"] = steps, None
    elif epoch:
        values["epochs"], values["steps"] = epoch, None
    warmup_steps, warmup_pct = num("lr_warmup_steps", int), num("lr_warmup")
    if warmup_steps:
        put("lr_warmup_steps", "warmup_steps", warmup_steps)
    elif warmup_pct:
        if values.get("steps"):
            put("lr_warmup", "warmup_steps", round(values["steps"] * warmup_pct / 100))
        else:
            notes.append(f"lr_warmup = {warmup_pct:g}% of the steps: the length is in epochs, so the step count depends on "
                         "the dataset; set warmup_steps in the preset by hand.")
    else:
        used["lr_warmup"] = "warmup_steps"
    put("train_batch_size", "batch_size", num("train_batch_size", int))
    put("gradient_accumulation_steps", "grad_accum", num("gradient_accumulation_steps", int))
    put("max_grad_norm", "max_grad_norm", num("max_grad_norm"))
    optimizer = (text("optimizer") or "").lower()
    if optimizer in _OPTIMIZERS:
        put("optimizer", "optimizer", _OPTIMIZERS[optimizer])
    args = text("optimizer_args") or ""
    if args:
        rest = []
        for part in args.split():
            key, _, value = part.partition("=")
            if key == "weight_decay":
                try:
                    values["weight_decay"] = float(value)
                    used["optimizer_args"] = "weight_decay"
                    continue
                except ValueError:
                    pass
            rest.append(part)
        if rest and "optimizer_args" in used:  # weight_decay was carried: report what is left of the line
            data = {**data, "optimizer_args (rest)": " ".join(rest)}
    # precision, seed, speed
    mp = text("mixed_precision")
    if mp in ("no", "fp16", "bf16"):
        put("mixed_precision", "mixed_precision", mp)
    sp = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(text("save_precision") or "")
    if sp:
        put("save_precision", "save_precision", sp)
    put("seed", "seed", num("seed", int))
    for key, target in (("cache_latents", "cache_latents"), ("gradient_checkpointing", "gradient_checkpointing"),
                        ("shuffle_caption", "shuffle_tags"), ("flip_aug", "random_flip"),
                        ("enable_bucket", "enable_buckets"), ("bucket_no_upscale", "bucket_no_upscale"),
                        ("masked_loss", "masked_loss")):
        if key in data:
            put(key, target, flag(key))
    if "random_crop" in data:
        put("random_crop", "center_crop", not flag("random_crop"))
    if flag("v_parameterization"):
        put("v_parameterization", "prediction_type", "v_prediction")
    elif "v_parameterization" in data:
        used["v_parameterization"] = "prediction_type"
    if text("log_with") in ("tensorboard", "all"):
        put("log_with", "log_with", "tensorboard")
    put("keep_tokens", "keep_tokens", num("keep_tokens", int))
    put("caption_dropout_rate", "caption_dropout", num("caption_dropout_rate"))
    gamma = num("min_snr_gamma")
    put("min_snr_gamma", "min_snr_gamma", gamma if gamma else None)
    put("noise_offset", "noise_offset", num("noise_offset"))
    put("prior_loss_weight", "prior_loss_weight", num("prior_loss_weight"))
    put("max_data_loader_n_workers", "num_workers", num("max_data_loader_n_workers", int))
    ext = text("caption_extension")
    if ext in (None, "", ".txt", ".caption", "txt", "caption"):
        used["caption_extension"] = "(sdlora reads .txt, then .caption)"
    res = text("max_resolution")
    if res:
        try:
            w, h = (int(float(v)) for v in str(res).replace("x", ",").split(","))
        except ValueError:
            raise KohyaImportError(f"{name}: key 'max_resolution' = {res!r} is not 'W,H' (e.g. \"1024,1024\").") from None
        side = w if w == h else int(round(math.sqrt(w * h) / 8) * 8)
        if w != h:
            notes.append(f"max_resolution {w}x{h} is not square: resolution = {side} (the same area).")
        put("max_resolution", "resolution", side)
    # previews and checkpoints
    put("sample_every_n_steps", "sample_every", num("sample_every_n_steps", int))
    prompts = text("sample_prompts")
    if isinstance(prompts, str):
        put("sample_prompts", "sample_prompts", [line.strip() for line in prompts.splitlines()
                                                  if line.strip() and not line.lstrip().startswith("#")] or None)
    put("save_every_n_steps", "save_every", num("save_every_n_steps", int))
    if text("save_model_as") in ("safetensors", None, ""):
        used["save_model_as"] = "format = kohya"
    if text("training_comment"):
        notes.append("training_comment is not carried: sdlora writes the trigger word into ss_training_comment.")

    not_carried, at_default = {}, []
    for key, value in data.items():
        if key in used or key in values:
            continue
        if key in _IMPLIED and key != "save_model_as":
            continue
        if _empty(value) or (key in ("clip_skip",) and str(value) in ("1", "1.0")) or (
                key in ("lr_scheduler_num_cycles", "lr_scheduler_power") and str(value) in ("1", "1.0", "")):
            at_default.append(key)
        else:
            not_carried[key] = value
    try:
        config = TrainConfig(**values)
    except Exception as exc:  # pydantic ValidationError: name the sdlora setting and the kohya key it came from
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        origin = {v: k for k, v in used.items()}
        fields = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        keys = ", ".join(f"{origin.get(f, f)} (-> {f})" for f in sorted(fields)) or "cross-field rule"
        raise KohyaImportError(f"{name}: key {keys} does not give a valid sdlora setting: "
                               f"{format_validation_error(exc)}") from None
    carried = {k: v for k, v in used.items() if k in data}
    return ImportResult(config=config, source=path, carried=carried, not_carried=not_carried,
                        at_default=sorted(at_default), notes=notes)
