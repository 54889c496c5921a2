"""Recognising a base-model spec without loading weights: builtin name, diffusers folder, single file, hub id."""

from __future__ import annotations

import re
from pathlib import Path

from ..paths import cache_dir
from .checkpoint_files import read_checkpoint_keys
from .common import CHECKPOINT_SUFFIXES, SUPPORTED, ModelLoadError, _in_channels_message, _read_json
from ..families import FAMILIES, ModelFamily, family_of_folder
from .tiny import BUILTIN_MODELS, TINY_SPEC

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_spec(spec: str) -> tuple[str, str]:
    """Classify a base-model spec without loading weights: (kind, location). Raises ModelLoadError for a missing path,
    a folder that is not a diffusers SD1/SD2/SDXL model, or a .safetensors file whose keys show it is not an
    SD1.x/SD2.x/SDXL checkpoint (LoRA, VAE, Flux, ...)."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("No base model given. Use builtin:tiny, a diffusers folder, a .safetensors file or a hub id.")
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise ModelLoadError(f"Unknown built-in model '{spec}'. The built-in models are {', '.join(BUILTIN_MODELS)}.")
        return "builtin", str(cache_dir() / BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        check_diffusers_folder(path)
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(f"Base model '{path}' is not a checkpoint file (expected {', '.join(CHECKPOINT_SUFFIXES)}). "
                                 + SUPPORTED)
        if path.suffix.lower() == ".safetensors":
            checkpoint_family(read_checkpoint_keys(path, allow_pickle=False), path)
        return "single_file", str(path)
    looks_like_path = spec.startswith((".", "~", "/")) or spec.count("/") > 1 or "\\" in spec \
        or path.suffix.lower() in CHECKPOINT_SUFFIXES
    if not looks_like_path and _HUB_ID.match(spec):
        return "hub", spec
    raise ModelLoadError(f"Base model '{spec}' not found: no such file or folder. Check the path, or use {TINY_SPEC} "
                         "(built in) or a hub id like owner/name.")



def check_diffusers_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers SD1.x/SD2.x/SDXL model folder, or a clear ModelLoadError (reads JSON configs only)."""
    index_path, unet_cfg_path = folder / "model_index.json", folder / "unet" / "config.json"
    index = _read_json(index_path) if index_path.is_file() else {}
    if not index and not (folder / "unet").is_dir():
        raise ModelLoadError(f"Base model folder '{folder}' has no model_index.json or unet/ folder: it is not a diffusers "
                             "model. Point at a diffusers folder or a single .safetensors checkpoint.")
    cls = str(index.get("_class_name", ""))
    if index and "unet" not in index:
        raise ModelLoadError(f"'{folder}' is a {cls or 'non-UNet'} model, not Stable Diffusion 1.x/2.x/XL. " + SUPPORTED)
    if "Refiner" in cls or ("text_encoder_2" in index and index.get("text_encoder", []) in (None, [None, None])):
        raise ModelLoadError(f"'{folder}' is the SDXL refiner (one OpenCLIP encoder, image-to-image only): train LoRAs on "
                             "the SDXL base model or a derivative. " + SUPPORTED)
    unet_cfg = _read_json(unet_cfg_path) if unet_cfg_path.is_file() else {}
    fam = family_of_folder(index, unet_cfg) or FAMILIES["sd1"]
    parts = ("unet", "vae", *fam.text_encoder_names, *fam.tokenizer_names, "scheduler")
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        raise ModelLoadError(f"Base model folder '{folder}' lacks {', '.join(p + '/' for p in missing)}: the diffusers model "
                             "is incomplete. Download it again, or point at a single .safetensors checkpoint.")
    if not unet_cfg_path.is_file():
        raise ModelLoadError(f"'{folder}' has no unet/config.json: the diffusers model is incomplete. Download it again.")
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(_in_channels_message(f"'{folder}'", unet_cfg["in_channels"]))
    return fam



_UNET = "model.diffusion_model."
_CONV_IN = _UNET + "input_blocks.0.0.weight"
_ATTN2_K = _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_ATTN2_K = _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


def checkpoint_family(keys: dict[str, tuple], path: Path) -> str:
    """'sd1' | 'sd2' | 'sdxl' from an original-layout checkpoint's key names and shapes; a clear ModelLoadError for
    anything sdlora cannot use as a base model (LoRA, SDXL refiner, Flux/SD3, VAE-only, inpainting, incomplete files)."""
    name = path.name
    names = list(keys)
    if not names:
        raise ModelLoadError(f"'{name}' holds no tensors: it is not a Stable Diffusion checkpoint. " + SUPPORTED)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k or ".lora_A." in k
           or ".lora.down." in k for k in names):
        raise ModelLoadError(f"'{name}' is a LoRA, not a base model. Use it with --lora (generate), and pick a full "
                             "SD1.x/SD2.x/SDXL checkpoint as the base model.")
    is_xl = any(k.startswith("conditioner.embedders.") for k in names)
    if is_xl and not all(any(k.startswith(p) for k in names) for p in _SDXL_TEXT):
        raise ModelLoadError(f"'{name}' is the SDXL refiner (or an SDXL file without both text encoders): train LoRAs on "
                             "the SDXL base model or a derivative. " + SUPPORTED)
    transformer_blocks = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.")
    if any(k.startswith(transformer_blocks) or k.removeprefix(_UNET).startswith(transformer_blocks) for k in names):
        raise ModelLoadError(f"'{name}' is a transformer-based model (Flux/SD3), not an SD1.x/SD2.x UNet model. " + SUPPORTED)
    if not any(k.startswith(_UNET) for k in names):
        if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")) for k in names):
            what = "a VAE (autoencoder) file"
        elif any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in names):
            what = "a textual-inversion embedding"
        elif any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in names):
            what = "a diffusers-format UNet weights file (point at the whole diffusers folder instead)"
        else:
            what = "not an SD1.x/SD2.x checkpoint (no model.diffusion_model.* UNet weights)"
        raise ModelLoadError(f"'{name}' is {what}, not a base model. " + SUPPORTED)
    conv_in = keys.get(_CONV_IN)
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(f"'{name}' has UNet weights without the usual first convolution ({_CONV_IN}): "
                             "unsupported layout. " + SUPPORTED)
    if conv_in[1] != 4:
        raise ModelLoadError(_in_channels_message(f"'{name}'", conv_in[1]))
    if is_xl:
        family = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in names):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in names):
        family = "sd1"
    else:
        raise ModelLoadError(f"'{name}' has no text encoder weights (cond_stage_model.*): it holds only part of a model. "
                             "Use a full checkpoint (UNet, VAE and text encoder). " + SUPPORTED)
    if not any(k.startswith("first_stage_model.") for k in names):
        raise ModelLoadError(f"'{name}' has no VAE weights (first_stage_model.*): it holds only part of a model. "
                             "Use a full checkpoint (UNet, VAE and text encoder). " + SUPPORTED)
    if conv_in[0] == 320:
        context = keys.get(_SDXL_ATTN2_K if is_xl else _ATTN2_K, (0, 0))[-1]
        want = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
        if context != want:
            raise ModelLoadError(f"'{name}' mixes a {family.upper()} text encoder with a UNet for {context}-wide text "
                                 "embeddings: unsupported architecture. " + SUPPORTED)
    return family


def detect_architecture(keys: dict[str, tuple], path: Path) -> str:
    """'sd15' | 'sd2' | 'sdxl' for the real sizes, 'tiny' / 'tiny-xl' for the built-in tiny models' sizes, 'custom' for
    other sizes (needs config_dir)."""
    family = checkpoint_family(keys, path)
    channels = keys[_CONV_IN][0]
    if channels == 320:
        return {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}[family]
    tiny = {"sd1": ("tiny", 32), "sdxl": ("tiny-xl", 32)}  # the built-in models' block_out_channels[0]
    arch, tiny_channels = tiny.get(family, ("custom", 0))
    return arch if channels == tiny_channels else "custom"

