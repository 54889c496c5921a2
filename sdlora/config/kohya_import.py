"""Import a kohya_ss GUI LoRA config (the .json its Save button writes) as a TrainConfig / TOML preset.

Every setting sdlora has is carried over; every key it does not carry is reported by name, split into the ones the
file actually sets (they would change a kohya run) and the ones at an empty/off value (no effect either way).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import USER_FILE_LIMIT, UserFileError, read_user_bytes
from .train_config import ConfigError, TrainConfig, field_choices, format_validation_error
from ..safetext import shown

_LOCON_TYPES = ("Kohya LoCon", "LyCORIS/LoCon", "LoCon")
_STANDARD_TYPES = ("Standard", "", None)
KOHYA_MAX_BYTES = 4 * USER_FILE_LIMIT  # kohya_ss GUI settings files are a few KiB
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


def _read_settings(path: Path, name: str) -> dict:
    """The JSON object of a kohya_ss settings file; KohyaImportError naming the file for anything else."""
    try:
        data = json.loads(read_user_bytes(path, KOHYA_MAX_BYTES).decode("utf-8-sig"))
    except UserFileError as exc:
        if exc.kind == "too_large":
            raise KohyaImportError(f"{name} is larger than 4 MiB: not a kohya_ss settings file.") from None
        if exc.kind == "folder":
            raise KohyaImportError(f"{name} cannot be read (Is a directory).") from None
        raise KohyaImportError(f"{name} is not a regular file (a device, pipe or socket). Give the .json file kohya_ss's "
                               "Save button wrote.") from None
    except FileNotFoundError:
        raise KohyaImportError(f"{name} not found. Give the .json file kohya_ss's Save button wrote.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KohyaImportError(f"{name} is not valid JSON ({exc}).") from None
    except OSError as exc:
        raise KohyaImportError(f"{name} cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(data, dict):
        raise KohyaImportError(f"{name} is not a JSON object of settings.")
    return data


def import_kohya_json(path) -> ImportResult:
    path = Path(path).expanduser()
    name = f"kohya_ss config '{shown(path)}'"
    data = _read_settings(path, name)
    r = _Reader(data, name)
    for row in KOHYA_KEYS:
        if isinstance(row, Key):
            value = row.read(r, row.kohya)
            if value is not SKIP:
                r.put(row.kohya, row.field, value)
        else:
            row(r)
    return _result(r, path)


class _Reader:
    """The kohya file's values read as sdlora values, and what the import has carried so far."""

    def __init__(self, data: dict, name: str):
        self.data, self.name = data, name
        self.used: dict[str, str] = {}  # kohya key -> the sdlora setting it went to (or why it needs none)
        self.values: dict[str, Any] = {}  # the TrainConfig fields so far
        self.notes: list[str] = []

    def put(self, key: str, field_name: str, value) -> None:
        self.used[key] = field_name
        if value is not None:
            self.values[field_name] = value

    def num(self, key: str, kind=float):
        value = self.data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise KohyaImportError(f"{self.name}: key '{key}' = {value!r} is not a number.") from None
        if not math.isfinite(number):
            raise KohyaImportError(f"{self.name}: key '{key}' = {value!r} is not a finite number.")
        if kind is int:
            if number != int(number):
                raise KohyaImportError(f"{self.name}: key '{key}' = {value!r} must be a whole number.")
            return int(number)
        return number

    def text(self, key: str):
        value = self.data.get(key)
        return value.strip() if isinstance(value, str) else value

    def flag(self, key: str):
        value = self.data.get(key)
        return value if isinstance(value, bool) else None if value in (None, "") else str(value).lower() in ("true", "1")


SKIP = object()  # a value sdlora has no setting for: the key is reported as not carried


@dataclass(frozen=True)
class Key:
    """One kohya key carried into one sdlora setting. `read` returns the setting's value, None to keep sdlora's
    default, or SKIP."""

    kohya: str
    field: str
    read: Callable[[_Reader, str], Any]


# -- how a kohya value reads ---------------------------------------------------------------------------------------
def _text(r: _Reader, key: str):
    return r.text(key) or None


def _whole(r: _Reader, key: str):
    return r.num(key, int)


def _number(r: _Reader, key: str):
    return r.num(key)


def _number_or_off(r: _Reader, key: str):  # kohya writes 0 for "off"
    return r.num(key) or None


def _switch(r: _Reader, key: str):
    return r.flag(key) if key in r.data else SKIP


def _inverted(r: _Reader, key: str):
    return (not r.flag(key)) if key in r.data else SKIP


def _choice(field_name: str, lower: bool = False):
    """A value sdlora offers for `field_name` (kohya's other optimizers, schedulers, precisions: not carried)."""
    choices = field_choices(field_name)

    def read(r: _Reader, key: str):
        value = (r.text(key) or "").lower() if lower else r.text(key)
        return value if value in choices else SKIP

    return read


def _save_precision(r: _Reader, key: str):
    return {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(r.text(key) or "") or SKIP


def _v_prediction(r: _Reader, key: str):
    return "v_prediction" if r.flag(key) else None if key in r.data else SKIP


def _tensorboard(r: _Reader, key: str):
    return "tensorboard" if r.text(key) in ("tensorboard", "all") else SKIP


def _plain_captions(r: _Reader, key: str):  # the extensions sdlora reads anyway
    return None if r.text(key) in (None, "", ".txt", ".caption", "txt", "caption") else SKIP


def _safetensors(r: _Reader, key: str):
    return None if r.text(key) in ("safetensors", None, "") else SKIP


def _prompt_lines(r: _Reader, key: str):
    prompts = r.text(key)
    if not isinstance(prompts, str):
        return SKIP
    return [line.strip() for line in prompts.splitlines() if line.strip() and not line.lstrip().startswith("#")] or None


def _square_resolution(r: _Reader, key: str):
    res = r.text(key)
    if not res:
        return SKIP
    try:
        w, h = (int(float(v)) for v in str(res).replace("x", ",").split(","))
    except ValueError:
        raise KohyaImportError(f"{r.name}: key 'max_resolution' = {res!r} is not 'W,H' (e.g. \"1024,1024\").") from None
    side = w if w == h else int(round(math.sqrt(w * h) / 8) * 8)
    if w != h:
        r.notes.append(f"max_resolution {w}x{h} is not square: resolution = {side} (the same area).")
    return side


# -- keys that decide together ---------------------------------------------------------------------------------------
def _data_folders(r: _Reader) -> None:
    if r.text("dataset_config"):
        r.put("dataset_config", "dataset_config", r.text("dataset_config"))
        if r.text("train_data_dir"):
            r.used["train_data_dir"] = "(replaced by dataset_config, as in kohya)"
    else:
        r.put("train_data_dir", "data_dir", r.text("train_data_dir") or None)
        r.used.setdefault("dataset_config", "dataset_config")


def _network_type(r: _Reader) -> None:
    lora_type = r.data.get("LoRA_type", "Standard")
    r.used["LoRA_type"] = "conv_rank (LoCon)" if lora_type in _LOCON_TYPES else "(standard LoRA)"
    if lora_type not in _STANDARD_TYPES + _LOCON_TYPES:
        r.notes.append(f"LoRA_type '{lora_type}' is not something sdlora trains: the preset trains a standard LoRA "
                       "(with conv layers when conv_dim is set); change it only if that is what you want.")


def _conv_layers(r: _Reader) -> None:
    if r.data.get("LoRA_type", "Standard") in _LOCON_TYPES and (r.num("conv_dim", int) or 0) > 0:
        r.put("conv_dim", "conv_rank", r.num("conv_dim", int))
        r.put("conv_alpha", "conv_alpha", r.num("conv_alpha"))


def _learning_rates(r: _Reader) -> None:
    lr, unet_lr, te_lr = r.num("learning_rate"), r.num("unet_lr"), r.num("text_encoder_lr")
    r.put("learning_rate", "lr", lr if lr else None)
    if unet_lr:  # kohya: unet_lr, when given, is the UNet's learning rate
        r.put("unet_lr", "lr", unet_lr)
    else:
        r.used["unet_lr"] = "lr"
    unet_only = r.flag("network_train_unet_only")
    train_te = not unet_only and not (te_lr == 0 and r.data.get("text_encoder_lr") not in (None, ""))
    r.put("network_train_unet_only", "train_text_encoder", train_te)
    r.used["text_encoder_lr"] = "text_encoder_lr"
    if train_te and te_lr:
        r.values["text_encoder_lr"] = te_lr


def _length(r: _Reader) -> None:
    steps, epoch, max_epochs = r.num("max_train_steps", int), r.num("epoch", int), r.num("max_train_epochs", int)
    r.used.update({"max_train_steps": "steps", "epoch": "epochs", "max_train_epochs": "epochs"})
    if max_epochs:
        r.values["epochs"], r.values["steps"] = max_epochs, None
    elif steps:
        r.values["steps"], r.values["epochs"] = steps, None
    elif epoch:
        r.values["epochs"], r.values["steps"] = epoch, None


def _warmup(r: _Reader) -> None:
    warmup_steps, warmup_pct = r.num("lr_warmup_steps", int), r.num("lr_warmup")
    if warmup_steps:
        r.put("lr_warmup_steps", "warmup_steps", warmup_steps)
    elif warmup_pct:
        if r.values.get("steps"):
            r.put("lr_warmup", "warmup_steps", round(r.values["steps"] * warmup_pct / 100))
        else:
            r.notes.append(f"lr_warmup = {warmup_pct:g}% of the steps: the length is in epochs, so the step count "
                           "depends on the dataset; set warmup_steps in the preset by hand.")
    else:
        r.used["lr_warmup"] = "warmup_steps"


def _optimizer_args(r: _Reader) -> None:
    args = r.text("optimizer_args") or ""
    if not args:
        return
    rest = []
    for part in args.split():
        key, _, value = part.partition("=")
        if key == "weight_decay":
            try:
                r.values["weight_decay"] = float(value)
                r.used["optimizer_args"] = "weight_decay"
                continue
            except ValueError:
                pass
        rest.append(part)
    if rest and "optimizer_args" in r.used:  # weight_decay was carried: report what is left of the line
        r.data = {**r.data, "optimizer_args (rest)": " ".join(rest)}


def _training_comment(r: _Reader) -> None:
    if r.text("training_comment"):
        r.notes.append("training_comment is not carried: sdlora writes the trigger word into ss_training_comment.")


# Read in this order: a later key may depend on an earlier one (lr_warmup on the steps), and the report lists the
# carried keys in it.
def _timestep(unset: int):
    """kohya's GUI writes 0 and 1000 for the whole range: those keep sdlora's unset default."""
    def read(r: _Reader, key: str):
        value = r.num(key, int)
        return None if value == unset else value

    return read


def _noise(r: _Reader) -> None:
    """kohya's GUI keeps both the offset and the pyramid noise values; noise_offset_type says which one it uses."""
    kind = r.text("noise_offset_type")
    offset = ("noise_offset",)
    multires = ("multires_noise_iterations", "multires_noise_discount")
    used, unused = (multires, offset) if kind == "Multires" else (offset, multires) if kind else (offset + multires, ())
    for key in used:
        if key == "multires_noise_iterations":
            r.put(key, key, r.num(key, int) or None)
        elif key in r.data:
            r.put(key, key, r.num(key))
    for key in unused:
        if key in r.data:
            r.put(key, f"(not used: noise_offset_type is {kind})", None)


KOHYA_KEYS: list[Key | Callable[[_Reader], None]] = [
    # model, data, output
    Key("pretrained_model_name_or_path", "base_model", _text),
    _data_folders,
    Key("reg_data_dir", "reg_data_dir", _text),
    Key("output_dir", "output_dir", _text),
    Key("output_name", "output_name", _text),
    # network
    _network_type,
    Key("network_dim", "rank", _whole),
    Key("network_alpha", "alpha", _number),
    _conv_layers,
    # learning rates and text encoder
    _learning_rates,
    Key("loraplus_lr_ratio", "loraplus_lr_ratio", _number_or_off),
    # schedule and length
    Key("lr_scheduler", "lr_scheduler", _choice("lr_scheduler")),
    _length,
    _warmup,
    Key("train_batch_size", "batch_size", _whole),
    Key("gradient_accumulation_steps", "grad_accum", _whole),
    Key("max_grad_norm", "max_grad_norm", _number),
    Key("optimizer", "optimizer", _choice("optimizer", lower=True)),
    _optimizer_args,
    # precision, seed, speed
    Key("mixed_precision", "mixed_precision", _choice("mixed_precision")),
    Key("save_precision", "save_precision", _save_precision),
    Key("seed", "seed", _whole),
    Key("cache_latents", "cache_latents", _switch),
    Key("gradient_checkpointing", "gradient_checkpointing", _switch),
    Key("shuffle_caption", "shuffle_tags", _switch),
    Key("flip_aug", "random_flip", _switch),
    Key("enable_bucket", "enable_buckets", _switch),
    Key("bucket_no_upscale", "bucket_no_upscale", _switch),
    Key("masked_loss", "masked_loss", _switch),
    Key("random_crop", "center_crop", _inverted),
    Key("v_parameterization", "prediction_type", _v_prediction),
    Key("log_with", "log_with", _tensorboard),
    Key("keep_tokens", "keep_tokens", _whole),
    Key("caption_dropout_rate", "caption_dropout", _number),
    Key("min_snr_gamma", "min_snr_gamma", _number_or_off),
    _noise,
    Key("ip_noise_gamma", "ip_noise_gamma", _number_or_off),
    Key("min_timestep", "min_timestep", _timestep(0)),
    Key("max_timestep", "max_timestep", _timestep(1000)),
    Key("loss_type", "loss_type", _choice("loss_type")),
    Key("huber_c", "huber_c", _number),
    Key("huber_schedule", "huber_schedule", _choice("huber_schedule")),
    Key("zero_terminal_snr", "zero_terminal_snr", _switch),
    Key("debiased_estimation_loss", "debiased_estimation_loss", _switch),
    Key("scale_weight_norms", "scale_weight_norms", _number_or_off),
    Key("caption_tag_dropout_rate", "caption_tag_dropout_rate", _number),
    Key("clip_skip", "clip_skip", _whole),
    Key("prior_loss_weight", "prior_loss_weight", _number),
    Key("max_data_loader_n_workers", "num_workers", _whole),
    Key("caption_extension", "(sdlora reads .txt, then .caption)", _plain_captions),
    Key("max_resolution", "resolution", _square_resolution),
    # previews and checkpoints
    Key("sample_every_n_steps", "sample_every", _whole),
    Key("sample_prompts", "sample_prompts", _prompt_lines),
    Key("save_every_n_steps", "save_every", _whole),
    Key("save_model_as", "format = kohya", _safetensors),
    _training_comment,
]


def _result(r: _Reader, path: Path) -> ImportResult:
    """The config the carried values make, and the keys left behind (set in the file, or at an empty/off value)."""
    not_carried, at_default = {}, []
    for key, value in r.data.items():
        if key in r.used or key in r.values:
            continue
        if key in _IMPLIED and key != "save_model_as":
            continue
        if _empty(value) or (
                key in ("lr_scheduler_num_cycles", "lr_scheduler_power") and str(value) in ("1", "1.0", "")):
            at_default.append(key)
        else:
            not_carried[key] = value
    try:
        config = TrainConfig(**r.values)
    except Exception as exc:  # pydantic ValidationError: name the sdlora setting and the kohya key it came from
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        origin = {v: k for k, v in r.used.items()}
        fields = {str(e["loc"][0]) for e in exc.errors() if e.get("loc")}
        keys = ", ".join(f"{origin.get(f, f)} (-> {f})" for f in sorted(fields)) or "cross-field rule"
        raise KohyaImportError(f"{r.name}: key {keys} does not give a valid sdlora setting: "
                               f"{format_validation_error(exc)}") from None
    carried = {k: v for k, v in r.used.items() if k in r.data}
    return ImportResult(config=config, source=path, carried=carried, not_carried=not_carried,
                        at_default=sorted(at_default), notes=r.notes)
