"""Recognising a base-model spec without loading weights: builtin name, diffusers folder, single file, hub id."""

from __future__ import annotations

from pathlib import Path

from ..families import FAMILIES, ModelFamily, family_of_checkpoint, family_of_folder
from ..paths import cache_dir
from .checkpoint_files import read_checkpoint_keys
from .common import CHECKPOINT_SUFFIXES, SUPPORTED, ModelLoadError, hub_id_shaped, in_channels_message, read_json
from .tiny import BUILTIN_MODELS, TINY_CHANNELS, TINY_MODELS, TINY_SPEC


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
    if hub_id_shaped(spec):
        return "hub", spec
    raise ModelLoadError(f"Base model '{spec}' not found: no such file or folder. Check the path, or use {TINY_SPEC} "
                         "(built in) or a hub id like owner/name.")



def check_diffusers_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers SD1.x/SD2.x/SDXL model folder, or a clear ModelLoadError (reads JSON configs only)."""
    index_path, unet_cfg_path = folder / "model_index.json", folder / "unet" / "config.json"
    index = read_json(index_path) if index_path.is_file() else {}
    if not index and not (folder / "unet").is_dir():
        raise ModelLoadError(f"Base model folder '{folder}' has no model_index.json or unet/ folder: it is not a diffusers "
                             "model. Point at a diffusers folder or a single .safetensors checkpoint.")
    cls = str(index.get("_class_name", ""))
    if index and "unet" not in index:
        raise ModelLoadError(f"'{folder}' is a {cls or 'non-UNet'} model, not Stable Diffusion 1.x/2.x/XL. " + SUPPORTED)
    if "Refiner" in cls or ("text_encoder_2" in index and index.get("text_encoder", []) in (None, [None, None])):
        raise ModelLoadError(f"'{folder}' is the SDXL refiner (one OpenCLIP encoder, image-to-image only): train LoRAs on "
                             "the SDXL base model or a derivative. " + SUPPORTED)
    unet_cfg = read_json(unet_cfg_path) if unet_cfg_path.is_file() else {}
    fam = family_of_folder(index, unet_cfg) or FAMILIES["sd1"]
    parts = ("unet", "vae", *fam.text_encoder_names, *fam.tokenizer_names, "scheduler")
    missing = [part for part in parts if not (folder / part).is_dir()]
    if missing:
        raise ModelLoadError(f"Base model folder '{folder}' lacks {', '.join(p + '/' for p in missing)}: the diffusers model "
                             "is incomplete. Download it again, or point at a single .safetensors checkpoint.")
    if not unet_cfg_path.is_file():
        raise ModelLoadError(f"'{folder}' has no unet/config.json: the diffusers model is incomplete. Download it again.")
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(in_channels_message(f"'{folder}'", unet_cfg["in_channels"]))
    return fam



UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
FULL_SIZE_CHANNELS = 320  # the first UNet level of every released SD1/SD2/SDXL model


def checkpoint_family(keys: dict[str, tuple], path: Path) -> ModelFamily:
    """The family of an original-layout checkpoint, from its key names and shapes (the families recognise their own
    files); a clear ModelLoadError for anything sdlora cannot use as a base model (LoRA, SDXL refiner, Flux/SD3,
    VAE-only, inpainting, incomplete files)."""
    name = path.name
    names = list(keys)
    if not names:
        raise ModelLoadError(f"'{name}' holds no tensors: it is not a Stable Diffusion checkpoint. " + SUPPORTED)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k or ".lora_A." in k
           or ".lora.down." in k for k in names):
        raise ModelLoadError(f"'{name}' is a LoRA, not a base model. Use it with --lora (generate), and pick a full "
                             "SD1.x/SD2.x/SDXL checkpoint as the base model.")
    family = family_of_checkpoint(keys)
    problem = family and family.checkpoint_problem(names)
    if problem:
        raise ModelLoadError(f"'{name}' {problem} " + SUPPORTED)
    transformer_blocks = ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks.")
    if any(k.startswith(transformer_blocks) or k.removeprefix(UNET).startswith(transformer_blocks) for k in names):
        raise ModelLoadError(f"'{name}' is a transformer-based model (Flux/SD3), not an SD1.x/SD2.x UNet model. " + SUPPORTED)
    if not any(k.startswith(UNET) for k in names):
        if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")) for k in names):
            what = "a VAE (autoencoder) file"
        elif any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in names):
            what = "a textual-inversion embedding"
        elif any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in names):
            what = "a diffusers-format UNet weights file (point at the whole diffusers folder instead)"
        else:
            what = "not an SD1.x/SD2.x checkpoint (no model.diffusion_model.* UNet weights)"
        raise ModelLoadError(f"'{name}' is {what}, not a base model. " + SUPPORTED)
    conv_in = keys.get(CONV_IN)
    if conv_in is None or len(conv_in) != 4:
        raise ModelLoadError(f"'{name}' has UNet weights without the usual first convolution ({CONV_IN}): "
                             "unsupported layout. " + SUPPORTED)
    if conv_in[1] != 4:
        raise ModelLoadError(in_channels_message(f"'{name}'", conv_in[1]))
    if family is None:
        raise ModelLoadError(f"'{name}' has no text encoder weights (cond_stage_model.*): it holds only part of a model. "
                             "Use a full checkpoint (UNet, VAE and text encoder). " + SUPPORTED)
    if not any(k.startswith("first_stage_model.") for k in names):
        raise ModelLoadError(f"'{name}' has no VAE weights (first_stage_model.*): it holds only part of a model. "
                             "Use a full checkpoint (UNet, VAE and text encoder). " + SUPPORTED)
    if conv_in[0] == FULL_SIZE_CHANNELS:
        context = keys.get(family.checkpoint_context_key, (0, 0))[-1]
        if context != family.context_dim:
            raise ModelLoadError(f"'{name}' mixes a {family.name.upper()} text encoder with a UNet for {context}-wide text "
                                 "embeddings: unsupported architecture. " + SUPPORTED)
    return family


def detect_architecture(keys: dict[str, tuple], path: Path) -> str:
    """The family's name for a full-size file ('sd15' | 'sd2' | 'sdxl'), 'tiny' / 'tiny-xl' for the built-in tiny
    models' sizes, 'custom' for other sizes (needs config_dir)."""
    family = checkpoint_family(keys, path)
    channels = keys[CONV_IN][0]
    if channels == FULL_SIZE_CHANNELS:
        return family.checkpoint_architecture
    tiny = TINY_MODELS.get(family.name)
    return tiny.removeprefix("builtin:") if tiny and channels == TINY_CHANNELS else "custom"
