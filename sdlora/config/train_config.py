"""One validated training configuration, TOML presets, and errors that name the field at fault."""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..adapters.targets import KNOWN_UNET_TARGETS, OTHER_UNET_LEAVES, UNET_SHORTHANDS
from ..errors import UserError
from ..fileio import atomic_write_text

TARGET_SHORTHANDS = tuple(UNET_SHORTHANDS)
OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
# Upper bounds for settings whose absurd values would pass every other check and then hang or overflow a run.
_MAX_INT = {"rank": 4096, "conv_rank": 4096, "steps": 10_000_000, "epochs": 1_000_000, "batch_size": 4096, "grad_accum": 4096,
            "sample_steps": 1000, "keep_tokens": 1000, "num_workers": 256, "warmup_steps": 10_000_000,
            "save_every": 10_000_000, "sample_every": 10_000_000, "validate_every": 10_000_000}


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the user: names the field and what to do."""


class TrainConfig(BaseModel):
    """Everything a training run needs. Unknown keys are refused so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train on / from
    base_model: str = Field("builtin:tiny", description="builtin:tiny, a diffusers folder, a .safetensors/.ckpt file or a hub id")
    data_dir: str = Field("", description="folder of images with captions")
    dataset_config: str = Field("", description="kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]); "
                                                "replaces data_dir")
    reg_data_dir: str = Field("", description="regularization images in kohya's N_class folders (class images)")
    prior_loss_weight: float = Field(1.0, description="loss weight of regularization samples (kohya's prior_loss_weight)")
    validation_split: float = Field(0.0, description="fraction of the training images held out for validation loss "
                                                     "(chosen from the seed; 0 = none)")
    validation_dir: str = Field("", description="folder of validation images with captions (scanned like data_dir); "
                                                "replaces validation_split")
    validate_every: int = Field(0, description="validation loss every N steps (0 = only at the end, when validation "
                                               "images are given)")
    masked_loss: bool = Field(False, description="masked loss (kohya's masked_loss): weight the loss per pixel by each "
                                                 "image's alpha channel, else its mask in mask_dir (white = learn, "
                                                 "black = ignore); images with neither are learned whole")
    mask_dir: str = Field("", description="folder of grayscale masks named like their images (used with masked_loss)")
    log_with: Literal["none", "tensorboard"] = Field("none", description="also log loss, lr and val_loss to TensorBoard "
                                                                          "(OUTPUT/logs/tensorboard)")
    output_dir: str = Field("outputs/lora", description="where the LoRA, samples, checkpoints and logs go")
    output_name: str = Field("lora", description="file name of the exported LoRA, without extension")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    allow_pickle: bool = Field(False, description="allow full pickle loading of .ckpt files (unsafe: only for files you trust)")

    # LoRA shape
    rank: int = Field(16, description="LoRA rank (dim)")
    alpha: float = Field(16.0, description="LoRA alpha; the update is scaled by alpha/rank")
    targets: list[str] = Field(default_factory=lambda: ["attn"], description="UNet modules or shorthands attn, attn1, attn2, transformer")
    conv_rank: int = Field(0, description="rank for LoRA on ResNet 3x3 convs (0 = off)")
    conv_alpha: float = Field(1.0, description="alpha for the conv LoRA")
    network: Literal["lora", "locon", "loha", "lokr"] = Field(
        "lora", description="adapter type: lora, locon (LoRA on the ResNet blocks too; needs conv_rank), loha "
                            "(Hadamard product), lokr (Kronecker product)")
    dora: bool = Field(False, description="DoRA: weight-decomposed adapter (a learned magnitude per input column)")
    lokr_factor: int = Field(-1, description="LoKr: factor of the Kronecker split (-1 = as balanced as possible)")
    lokr_full_matrix: bool = Field(False, description="LoKr: keep the second factor a full matrix (no rank limit)")
    tucker: bool = Field(False, description="conv 3x3 layers with a Tucker core (LyCORIS use_tucker)")
    dropout: float = Field(0.0, description="dropout inside the adapter (0 = off)")
    rank_dropout: float = Field(0.0, description="drop this fraction of the rank at each step (kohya/LyCORIS rank_dropout)")
    module_dropout: float = Field(0.0, description="skip an adapted module at a step with this probability")
    train_text_encoder: bool = False
    text_encoder_lr: float | list[float] | None = Field(
        None, description="text encoder learning rate (default: same as lr); for SDXL one value for both encoders or "
                          "[te1, te2] (0 keeps that encoder frozen), as kohya's text_encoder_lr")

    # optimisation
    lr: float = 1e-4
    loraplus_lr_ratio: float | None = Field(None, description="LoRA+: the up (B) matrices learn at lr x this ratio "
                                                               "(16 is usual); unset = off")
    steps: int | None = Field(None, description="optimizer steps; if unset, --epochs decides")
    epochs: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    warmup_steps: int = 0
    min_snr_gamma: float | None = Field(None, description="min-SNR loss weighting gamma (5 is usual); unset = off")
    noise_offset: float = 0.0
    seed: int = 42
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the UNet (CUDA; the first steps are slower while it compiles)")

    # data
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    enable_buckets: bool = False
    bucket_no_upscale: bool = Field(False, description="with buckets: an image smaller than resolution² keeps its own size "
                                                       "(sides rounded down to the bucket step) instead of being upscaled")
    upscale_small: bool = Field(True, description="upscale images smaller than the resolution (else skip them)")
    default_caption: str = ""
    trigger_word: str = ""
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    cache_latents: bool = True
    num_workers: int = 0

    # previews, checkpoints, export
    sample_every: int = Field(0, description="preview every N steps (0 = only at the end, if prompts are given)")
    sample_prompts: list[str] = Field(default_factory=list, description="prompt lines (kohya options --n --w --h --d --l --s)")
    sample_prompts_file: str = ""
    sample_steps: int = 20
    save_every: int = Field(0, description="checkpoint every N steps (0 = off)")
    resume: str = Field("", description="checkpoint folder to resume from, or 'latest'")
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    format: Literal["kohya", "diffusers"] = "kohya"

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}")
        return v

    @field_validator(*_MAX_INT)
    @classmethod
    def _not_absurd(cls, v: int | None, info) -> int | None:
        if v is not None and v > _MAX_INT[info.field_name]:
            raise ValueError(f"must be at most {_MAX_INT[info.field_name]:,}")
        return v

    @field_validator("trigger_word", "default_caption", "sample_prompts")
    @classmethod
    def _valid_text(cls, v):
        # Text from a command line or a file name that is not UTF-8 carries surrogate escapes, which no tokenizer or
        # metadata writer accepts: keep what can be kept, mark the rest with U+FFFD.
        from ..safetext import clean_text

        return [clean_text(x) for x in v] if isinstance(v, list) else clean_text(v)

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1 (typical: 4-128)")
        return v

    @field_validator("validation_split")
    @classmethod
    def _split_fraction(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 <= v < 1:
            raise ValueError("must be at least 0 and below 1 (a fraction of the training images; 0.1 is usual)")
        return v

    @field_validator("conv_rank", "warmup_steps", "save_every", "sample_every", "keep_tokens", "num_workers", "validate_every")
    @classmethod
    def _non_negative_int(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be 0 or more")
        return v

    @field_validator("alpha", "conv_alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError("must be a positive number (commonly equal to the rank, or 1)")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_valid(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0 or v > 1):
            raise ValueError("must be a number between 0 and 1 (typical: 1e-4)")
        return v

    @field_validator("text_encoder_lr")
    @classmethod
    def _te_lr_valid(cls, v):
        values = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not 1 <= len(v) <= 2:
            raise ValueError("give one learning rate, or two for SDXL's two text encoders, e.g. [5e-5, 1e-5]")
        for x in values:
            if not math.isfinite(x) or x < 0 or x > 1:
                raise ValueError("must be between 0 and 1 (typical: 5e-5; 0 keeps that text encoder frozen)")
        if values and not any(values):
            raise ValueError("is 0 for every text encoder: turn off train_text_encoder instead")
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution_valid(cls, v: int) -> int:
        if v < 64 or v % 8:
            raise ValueError("must be a multiple of 8 and at least 64 (e.g. 512 for SD1.5, 768 for SD2)")
        if v > 4096:
            raise ValueError("must be at most 4096")
        return v

    @field_validator("batch_size", "grad_accum", "sample_steps")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("steps", "epochs")
    @classmethod
    def _positive_or_none(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("caption_dropout")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be between 0 and 1 (a probability; 0.05 is usual)")
        return v

    @field_validator("noise_offset", "weight_decay", "max_grad_norm")
    @classmethod
    def _non_negative_float(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("must be 0 or a positive number")
        return v

    @field_validator("prior_loss_weight")
    @classmethod
    def _prior_weight(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0 or v > 1000:
            raise ValueError("must be between 0 and 1000 (1.0 is usual)")
        return v

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _loraplus(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 1 or v > 1000):
            raise ValueError("must be between 1 and 1000 (16 is usual), or unset to turn LoRA+ off")
        return v

    @field_validator("dropout", "rank_dropout", "module_dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0 or v >= 1:
            raise ValueError("must be at least 0 and below 1 (0 = off; 0.1 is usual)")
        return v

    @field_validator("lokr_factor")
    @classmethod
    def _lokr_factor(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("use -1 (as balanced as possible) or a positive factor such as 4 or 8")
        return v

    @field_validator("min_snr_gamma")
    @classmethod
    def _gamma_positive(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError("must be a positive number (5 is usual), or unset to turn it off")
        return v

    @field_validator("targets")
    @classmethod
    def _targets_known_shape(cls, v: list[str]) -> list[str]:
        cleaned = [t.strip() for t in v if t and t.strip()]
        if not cleaned:
            raise ValueError(f"choose at least one target ({', '.join(TARGET_SHORTHANDS)} or module names like to_q)")
        for t in cleaned:
            if not re.fullmatch(r"[A-Za-z0-9_.]+", t):
                raise ValueError(f"'{t}' is not a module name; use {', '.join(TARGET_SHORTHANDS)} or names like to_q, ff.net.2")
            if t not in TARGET_SHORTHANDS and not any(t == k or t.endswith("." + k) for k in KNOWN_UNET_TARGETS + OTHER_UNET_LEAVES):
                raise ValueError(f"unknown target module '{t}'; use {', '.join(TARGET_SHORTHANDS)} or any of {', '.join(KNOWN_UNET_TARGETS)}")
        return cleaned

    @field_validator("output_name")
    @classmethod
    def _output_name_safe(cls, v: str) -> str:
        v = v.strip()
        if v.endswith(".safetensors"):
            v = v[: -len(".safetensors")]
        if not OUTPUT_NAME_RE.fullmatch(v) or ".." in v:
            raise ValueError("use letters, digits, '.', '_', '-' or spaces only (no folders, no '..'), e.g. my_lora")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainConfig":
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_lr is set but train_text_encoder is off: turn on train_text_encoder or remove text_encoder_lr")
        if self.bucket_no_upscale and not self.enable_buckets:
            raise ValueError("bucket_no_upscale needs aspect-ratio buckets: turn on enable_buckets (--buckets) or remove bucket_no_upscale")
        if self.dataset_config and self.data_dir:
            raise ValueError("data_dir and dataset_config are both set: the dataset TOML names its own image folders, so "
                             "clear data_dir (--data) or dataset_config")
        if self.reg_data_dir and self.dataset_config:
            raise ValueError("reg_data_dir and dataset_config are both set: put the regularization folders in the dataset "
                             "TOML as subsets with is_reg = true, or clear dataset_config")
        if self.validation_split and self.validation_dir:
            raise ValueError("validation_split and validation_dir are both set: hold out part of the training images "
                             "(validation_split) or give a separate folder (validation_dir), not both")
        if self.mask_dir and not self.masked_loss:
            raise ValueError("mask_dir is set but masked_loss is off: turn on masked_loss (--masked-loss) or clear mask_dir")
        if self.validate_every and not (self.validation_split or self.validation_dir):
            raise ValueError("validate_every is set but there are no validation images: set validation_split (e.g. 0.1) "
                             "or validation_dir")
        if self.network == "locon" and not self.conv_rank:
            raise ValueError("network locon adapts the ResNet blocks' convs: set conv_rank (e.g. 8, with conv_alpha 4), "
                             "or choose network lora")
        if self.loraplus_lr_ratio and self.network in ("loha", "lokr"):
            raise ValueError(f"loraplus_lr_ratio works on LoRA's up/down pairs; {self.network} has none: remove it or "
                             "choose network lora/locon")
        if self.dropout and self.network in ("loha", "lokr"):
            raise ValueError(f"dropout: {self.network} has no dropout inside the adapter; use rank_dropout or "
                             "module_dropout instead")
        lycoris = self.network in ("loha", "lokr") or self.dora or self.tucker or self.rank_dropout or self.module_dropout
        if self.format == "diffusers" and lycoris:
            raise ValueError("format diffusers holds plain LoRA only; LoHa, LoKr, DoRA, Tucker and rank/module dropout "
                             "runs export in the kohya/LyCORIS format that ComfyUI and A1111 read: set format = kohya")
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", 500)
        if self.warmup_steps and self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self

    # helpers -----------------------------------------------------------------
    def text_encoder_lrs(self, count: int) -> list[float]:
        """One learning rate per text encoder of the model (SD1/SD2: 1, SDXL: 2)."""
        v = self.text_encoder_lr
        if v is None:
            return [self.lr] * count
        values = list(v) if isinstance(v, list) else [v]
        if len(values) not in (1, count):
            raise ConfigError(f"text_encoder_lr: {len(values)} values given, but this model has {count} text encoder"
                              f"{'s' if count > 1 else ''}. Give one value{' or ' + str(count) if count > 1 else ''}.")
        return values * count if len(values) == 1 else values

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()

    def all_sample_prompts(self) -> list[str]:
        prompts = list(self.sample_prompts)
        if self.sample_prompts_file:
            path = Path(self.sample_prompts_file).expanduser()
            from ..fileio import read_text_limited

            try:  # a regular file of at most 1 MiB: a FIFO or device must never block or flood a run
                text = read_text_limited(path)
            except ValueError as exc:
                raise ConfigError(f"sample_prompts_file: {exc}. Give a prompt file (one prompt per line) or clear the field.") from None
            except OSError as exc:
                raise ConfigError(f"sample_prompts_file: cannot read '{path}' ({exc.strerror or exc}). Fix the path or clear the field.") from exc
            if "\x00" in text:  # a binary file picked by mistake would become a screenful of garbage previews
                from ..safetext import shown

                raise ConfigError(f"sample_prompts_file: '{shown(path)}' is a binary file, not a text file of prompts. Give a "
                                  "prompt file (one prompt per line) or clear the field.")
            prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return prompts


def format_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's error list into sentences that name each field."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = loc or "config"
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            known = ", ".join(sorted(TrainConfig.model_fields))
            msg = f"unknown setting (known settings: {known})"
        elif "input" in err and err.get("type") not in ("missing",) and loc:  # a cross-field rule names its fields itself
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{field}: {msg}")
    return "Invalid configuration — " + "; ".join(lines)


def make_config(**values: Any) -> TrainConfig:
    """Build a TrainConfig, raising ConfigError with field names instead of pydantic's dump."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


PRESET_MAX_BYTES = 1 << 20


def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    import stat

    from ..safetext import shown

    path = Path(path).expanduser()
    shown_path = shown(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"Preset '{shown_path}' is a folder; give a .toml file (see presets/).")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"Preset '{shown_path}' is not a regular file (a device, pipe or socket); give a .toml file.")
        if st.st_size > PRESET_MAX_BYTES:
            raise ConfigError(f"Preset '{shown_path}' is {st.st_size:,} bytes: far too large for a settings file. Give a .toml preset.")
        with open(path, "rb") as fh:
            raw = fh.read(PRESET_MAX_BYTES + 1)
        if b"\x00" in raw:
            raise ConfigError(f"Preset '{shown_path}' is a binary file, not a TOML text file. Give a .toml preset.")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Preset '{shown_path}' not found. Check the path, or pick one from presets/.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Preset '{shown_path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Preset '{shown_path}' is not valid TOML: {exc}. Fix the file and try again.") from None
    except RecursionError:
        raise ConfigError(f"Preset '{shown_path}' is nested too deeply to be a preset.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read preset '{shown_path}': {exc.strerror or exc}.") from None
    # Presets may group settings in tables ([lora], [training], ...): flatten them.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key in flat:
                    raise ConfigError(f"Preset '{path}': setting '{sub_key}' appears twice.")
                flat[sub_key] = sub_value
        else:
            if key in flat:
                raise ConfigError(f"Preset '{path}': setting '{key}' appears twice.")
            flat[key] = value
    return flat


def config_from_preset(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values = load_preset(path)
    values.update(overrides or {})
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"Preset '{path}': " + format_validation_error(exc)) from None


def save_preset(config: TrainConfig, path: str | os.PathLike, *, header: str = "") -> Path:
    """Write the config as a flat TOML preset, atomically (temp file + rename)."""
    path = Path(path).expanduser()
    data = {k: v for k, v in config.model_dump().items() if v is not None and k != "resume"}
    body = tomli_w.dumps(data)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + body
    atomic_write_text(path, text)
    return path


def parse_set_value(raw: str) -> Any:
    """`--set key=value` values are TOML literals when they parse as such, else plain strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
