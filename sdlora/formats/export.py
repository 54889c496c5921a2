"""Write a trained LoRA as a kohya/A1111 `.safetensors` (or diffusers/PEFT format), with metadata.

kohya format, per adapted module PREFIX:
  PREFIX.lora_down.weight  (r x in, or r x in x k x k for convs)
  PREFIX.lora_up.weight    (out x r, or out x r x 1 x 1)
  PREFIX.alpha             (0-d)
The effect is W' = W + (alpha / r) * up @ down.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.layers import adapted_layers, file_parts
from ..errors import UserError
from ..fileio import atomic_path
from .kohya_names import KohyaNameError
from .lora_file import read_lora

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

class ExportError(UserError, RuntimeError):
    pass


def kohya_names(family, component: str, module: torch.nn.Module, paths: list[str]) -> dict[str, str]:
    """Module path -> kohya prefix for the adapted modules of one component, by the family's naming rule."""
    config = module.config if component == "unet" else None
    names = {}
    for path in paths:
        try:
            prefix = family.kohya_prefix(component, path, config)
        except KohyaNameError as exc:
            raise ExportError(str(exc)) from None
        if prefix is None:
            raise ExportError(f"{component} module '{path}' has no kohya name for {family.label}.")
        names[path] = prefix
    if component == "unet" and family.kohya_unet_names_are_diffusers_paths:
        _check_against_diffusers(names)
    return names


def _check_against_diffusers(names: dict[str, str]) -> None:
    """UNet names that are diffusers paths (SD1/SD2): our rule, confirmed against diffusers' PEFT->kohya converter, which
    is right for them; fail loudly if a future release changes that. (It is not right for SDXL, whose kohya names are
    LDM names.)"""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya({f"unet.{p}.lora_A.weight": torch.zeros(1) for p in names})
    for path, prefix in names.items():
        if f"{prefix}.lora_down.weight" not in converted:
            raise ExportError(f"diffusers' kohya converter does not name UNet module '{path}' '{prefix}'.")


def kohya_state_dict(family, modules: dict[str, torch.nn.Module], *, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors for every adapted component (`modules`: component name -> module carrying the adapter):
    `<prefix>.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`, `.dora_scale`, `.alpha`, ... as the adapter type has them."""
    tensors: dict[str, torch.Tensor] = {}
    for component, module in modules.items():
        found = list(adapted_layers(module))
        names = kohya_names(family, component, module, [path for path, _ in found])
        for path, layer in found:
            for part, value in file_parts(layer).items():
                tensors[f"{names[path]}.{part}"] = value.detach().to("cpu", dtype).contiguous()
    return tensors


def tensors_hash(path: Path) -> str:
    """kohya's `sshs_model_hash`: sha256 of a safetensors file's tensor data (everything after the header)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: Path) -> str:
    """kohya's `sshs_legacy_hash`: first 8 hex of sha256 over 64 KiB at offset 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write next to the target and rename, so a crash never leaves a half-written file under the real name."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def build_metadata(*, config, base, num_images: int, tag_frequency: dict, steps_done: int, epochs_done: int,
                   started_at: float | None, finished_at: float | None, resolution: tuple[int, int] | None = None,
                   unet_modules: int = 0, te_modules: int = 0, data=None) -> dict[str, str]:
    """kohya `ss_*` keys and `modelspec.*` keys; every value is a string, as safetensors requires."""
    family = base.family
    pred = getattr(base, "prediction_type", "epsilon")
    res = resolution or (config.resolution, config.resolution)
    te_lrs = config.text_encoder_lrs(len(family.text_encoder_names)) if config.train_text_encoder else [0.0]
    # kohya writes one value, or the list when the encoders differ.
    te_lr = te_lrs[0] if len(set(te_lrs)) == 1 else te_lrs
    from ..adapters.spec import AdapterSpec

    md = {
        **AdapterSpec.from_config(config).network_metadata(),
        **{k: v for k, v in family.metadata(pred).items() if k.startswith("ss_")},
        "ss_sd_model_name": getattr(base, "name", config.base_model),
        "ss_sd_model_hash": getattr(base, "model_hash", ""),
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_steps": str(steps_done),
        "ss_max_train_steps": str(steps_done),
        "ss_epoch": str(epochs_done),
        "ss_learning_rate": str(config.lr),
        "ss_unet_lr": str(config.lr),
        "ss_text_encoder_lr": str(te_lr),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_num_train_images": str(num_images),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_optimizer": config.optimizer,
        "ss_mixed_precision": config.mixed_precision,
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_enable_bucket": str(config.enable_buckets),
        "ss_cache_latents": str(config.cache_latents),
        "ss_prediction_type": pred,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_seed": str(config.seed),
        "ss_training_started_at": str(started_at or ""),
        "ss_training_finished_at": str(finished_at or ""),
        "ss_output_name": config.output_name,
        "ss_training_comment": f"trigger word: {config.trigger_word}" if config.trigger_word else "",
        "ss_sdlora_unet_modules": str(unet_modules),
        "ss_sdlora_text_encoder_modules": str(te_modules),
        "modelspec.sai_model_spec": "1.0.0",
        **{k: v for k, v in family.metadata(pred).items() if k.startswith("modelspec.")},
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.date": _iso(finished_at or started_at),
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
    }
    md["ss_prior_loss_weight"] = str(config.prior_loss_weight)
    md["ss_num_reg_images"] = str(data.num_reg_images if data is not None else 0)
    if config.validation_split or config.validation_dir:
        md["ss_validation_split"] = str(config.validation_split)
        md["ss_validate_every"] = str(config.validate_every)
    md["ss_masked_loss"] = str(bool(config.masked_loss or (data is not None and data.dataset.uses_masks)))
    if config.loraplus_lr_ratio:
        md["ss_loraplus_lr_ratio"] = str(config.loraplus_lr_ratio)
    if data is not None:  # kohya's dataset keys (training_data.TrainingData)
        md["ss_dataset_dirs"] = json.dumps(data.dataset_dirs(reg=False))
        md["ss_reg_dataset_dirs"] = json.dumps(data.dataset_dirs(reg=True))
        md["ss_datasets"] = json.dumps(data.datasets_metadata(config.batch_size))
    md.update(objective_metadata(config))
    if config.trigger_word:
        md["modelspec.trigger_phrase"] = config.trigger_word
    return md


def objective_metadata(config) -> dict[str, str]:
    """kohya's keys for the loss, noise and text-encoder options, written as train_network.py writes them; an option
    left at its default writes nothing, so files of runs that do not use them stay as they were."""
    md: dict[str, str] = {}
    if config.clip_skip > 1:
        md["ss_clip_skip"] = str(config.clip_skip)
    if config.min_timestep is not None or config.max_timestep is not None:
        md["ss_min_timestep"], md["ss_max_timestep"] = str(config.min_timestep), str(config.max_timestep)
    if config.loss_type != "l2":
        md.update(ss_loss_type=config.loss_type, ss_huber_schedule=config.huber_schedule, ss_huber_c=str(config.huber_c))
    if config.multires_noise_iterations:
        md["ss_multires_noise_iterations"] = str(config.multires_noise_iterations)
        md["ss_multires_noise_discount"] = str(config.multires_noise_discount)
    options = {"ss_ip_noise_gamma": config.ip_noise_gamma or None, "ss_zero_terminal_snr": config.zero_terminal_snr or None,
               "ss_debiased_estimation": config.debiased_estimation_loss or None,
               "ss_scale_weight_norms": config.scale_weight_norms,
               "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate or None}
    md.update({k: str(v) for k, v in options.items() if v is not None})
    return md


def with_hashes(path: Path, tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """Hash the tensor data the way kohya does; the data section does not depend on the metadata."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        probe = Path(tmp) / "probe.safetensors"
        save_file(tensors, probe, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
        out = dict(metadata)
        out["sshs_model_hash"] = tensors_hash(probe)
        out["sshs_legacy_hash"] = legacy_hash(probe)
    return out


def export_kohya(path: Path, family, modules: dict, *, metadata: dict[str, str] | None = None, precision: str = "fp16") -> Path:
    """kohya/A1111/ComfyUI layout; `modules`: component name ("unet", "text_encoder", "text_encoder_2") -> module."""
    path = Path(path)
    tensors = kohya_state_dict(family, modules, dtype=PRECISIONS[precision])
    if not tensors:
        raise ExportError("Nothing to export: the model has no LoRA layers.")
    metadata = dict(metadata or {})
    metadata["ss_save_precision"] = precision
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = with_hashes(path, tensors, metadata)
    return save_safetensors_atomic(tensors, path, metadata)


def export_diffusers(path: Path, family, modules: dict, *, metadata: dict[str, str] | None = None, precision: str = "fp16") -> Path:
    """diffusers/PEFT layout (`unet.*.lora_A.weight`, `text_encoder_2.*` for SDXL), with the LoRA configs so alpha
    survives a reload; written by the family's own pipeline class."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    dtype = PRECISIONS[precision]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def cast(sd):
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}

    # PEFT keys as they are (lora_A/lora_B): diffusers' convert_state_dict_to_diffusers turns attention
    # layers into the legacy `.lora.down` naming, which its own loader then silently drops.
    layers, configs = {}, {}
    for component, module in modules.items():
        layers[f"{component}_lora_layers"] = cast(get_peft_model_state_dict(module))
        configs[f"{component}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    pipeline_class = getattr(diffusers, family.pipeline_class)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        pipeline_class.save_lora_weights(tmp, weight_name="lora.safetensors", **layers, **configs)
        written = Path(tmp) / "lora.safetensors"
        # Re-save with our metadata added to the one diffusers wrote (which holds the adapter configs).
        tensors, md = read_lora(written)
        md.update(metadata or {})
        md["ss_save_precision"] = precision
        md["sdlora_format"] = "diffusers"
        save_safetensors_atomic(tensors, path, md)
        shutil.rmtree(tmp, ignore_errors=True)
    return path

