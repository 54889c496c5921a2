"""Load a base model — built-in tiny model, diffusers folder, single-file checkpoint or hub id — offline by default.

Single-file checkpoints in the original (LDM/CompVis) layout carry weights only. sdlora supplies what they lack:
the component configs of SD1.5, SD2-base and SD2-768-v (`model_configs.py`) and CLIP's tokenizer, built from the
vendored BPE vocabulary (`assets/`). They are written once into the cache and passed to diffusers' single-file
converters with `local_files_only=True`, so a downloaded `.safetensors` loads with no hub access.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .model_configs import (
    MODEL_CONFIGS,
    bytes_to_unicode,
    config_folder,
    write_tokenizer,
)
from .paths import cache_dir

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Loading bars and config notices from diffusers/transformers drown sdlora's own progress output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


quiet_libraries()

TINY_SPEC = "builtin:tiny"
TINY_VERSION = "tiny-v1"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SAMPLERS = ("euler_a", "euler", "ddim", "dpm++")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SUPPORTED = ("Supported base models: SD1.x and SD2.x (512 and 768-v), as a diffusers folder or a single "
             ".safetensors/.ckpt checkpoint, or builtin:tiny.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A base model could not be resolved or loaded; the message is a sentence for the user."""


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler      # the training scheduler, prediction_type set
    family: str                         # "sd1" | "sd2"
    prediction_type: str                # "epsilon" | "v_prediction"
    source: str                         # the spec as given
    kind: str                           # "builtin" | "folder" | "single_file" | "hub"
    default_resolution: int             # 512 sd1 / sd2-base, 768 sd2-v, 64 builtin:tiny
    model_hash: str                     # short id of the base weights (cheap: not a full-file hash)
    name: str                           # file stem, folder name, hub id or builtin:tiny

    def make_pipeline(self, scheduler: str = "euler_a", *, unet=None, text_encoder=None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline sharing this model's modules (or the given LoRA-carrying ones); no safety checker.
        The sampling scheduler is derived from the training scheduler's config, so betas and prediction type match."""
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
        )

        classes = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
                   "dpm++": DPMSolverMultistepScheduler}
        if scheduler not in classes:
            raise ValueError(f"Unknown sampler '{scheduler}'. Choose one of: {', '.join(SAMPLERS)}.")
        sched = classes[scheduler].from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=text_encoder or self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet or self.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


# --- the built-in tiny model -----------------------------------------------------------------------

_TINY_WORDS = ("a an the of on in at with and photo picture red blue green yellow grey purple white black orange circle "
               "square background centered left right top bottom mascot sdlora style portrait of person dog cat man woman "
               "detailed high quality lowres blurry painting drawing sketch landscape city night day sky tree house").split()


def _learn_merges(words, count: int = 300) -> list[str]:
    """A few hundred BPE merges from a small word list: enough for realistic multi-character tokens."""
    corpus = Counter({tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words})
    merges = []
    for _ in range(count):
        pairs = Counter()
        for word, freq in corpus.items():
            for a, b in pairwise(word):
                pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        new = Counter()
        for word, freq in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += freq
        corpus = new
    return merges


def build_tiny_model(folder: Path) -> Path:
    """Write the tiny SD1-shaped model as a diffusers folder. Fixed seeds: the same weights every time."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _learn_merges(_TINY_WORDS)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok_dir = folder / "tokenizer"
    write_tokenizer(tok_dir, vocab, merges, pad_token="<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=False)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    scheduler = PNDMScheduler.from_config(MODEL_CONFIGS["sd15"]["scheduler"])
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_model_dir() -> Path:
    """Build once (in a temp folder, renamed into place, so concurrent first uses are safe), then reuse."""
    final = cache_dir() / TINY_VERSION
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}.", dir=final.parent))
    try:
        build_tiny_model(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- resolving a spec (cheap: file headers and JSON only) ------------------------------------------

def resolve_model_spec(spec: str) -> tuple[str, str]:
    """Classify a base-model spec without loading weights: (kind, location). Raises ModelLoadError for a missing path,
    a folder that is not a diffusers SD model, or a .safetensors file whose keys show it is not an SD1.x/SD2.x
    checkpoint (LoRA, SDXL, VAE, ...)."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("No base model given. Use builtin:tiny, a diffusers folder, a .safetensors file or a hub id.")
    if spec.startswith("builtin:"):
        if spec != TINY_SPEC:
            raise ModelLoadError(f"Unknown built-in model '{spec}'. The built-in model is {TINY_SPEC}.")
        return "builtin", str(cache_dir() / TINY_VERSION)
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read '{path}': {exc}. The model folder looks damaged; download it again.") from None


def check_diffusers_folder(folder: Path) -> None:
    """Raise a clear ModelLoadError unless `folder` is a diffusers SD1.x/SD2.x model (reads JSON configs only)."""
    index_path, unet_cfg_path = folder / "model_index.json", folder / "unet" / "config.json"
    index = _read_json(index_path) if index_path.is_file() else {}
    if not index and not (folder / "unet").is_dir():
        raise ModelLoadError(f"Base model folder '{folder}' has no model_index.json or unet/ folder: it is not a diffusers "
                             "model. Point at a diffusers folder or a single .safetensors checkpoint.")
    cls = str(index.get("_class_name", ""))
    if "text_encoder_2" in index or "XL" in cls:
        raise ModelLoadError(f"'{folder}' is an SDXL model: SDXL models are not supported yet. " + SUPPORTED)
    if index and "unet" not in index:
        raise ModelLoadError(f"'{folder}' is a {cls or 'non-UNet'} model, not Stable Diffusion 1.x/2.x. " + SUPPORTED)
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / part).is_dir()]
    if missing:
        raise ModelLoadError(f"Base model folder '{folder}' lacks {', '.join(p + '/' for p in missing)}: the diffusers model "
                             "is incomplete. Download it again, or point at a single .safetensors checkpoint.")
    if not unet_cfg_path.is_file():
        raise ModelLoadError(f"'{folder}' has no unet/config.json: the diffusers model is incomplete. Download it again.")
    unet_cfg = _read_json(unet_cfg_path)
    if unet_cfg.get("addition_embed_type") == "text_time" or _context_dim(unet_cfg) >= 2048:
        raise ModelLoadError(f"'{folder}' is an SDXL model: SDXL models are not supported yet. " + SUPPORTED)
    if unet_cfg.get("in_channels", 4) != 4:
        raise ModelLoadError(_in_channels_message(f"'{folder}'", unet_cfg["in_channels"]))


def _context_dim(unet_cfg) -> int:
    dim = unet_cfg.get("cross_attention_dim", 768) if isinstance(unet_cfg, dict) else unet_cfg.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


def _in_channels_message(what: str, channels: int) -> str:
    kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-conditioned model"}.get(channels, "not a text-to-image model")
    return (f"{what} has a UNet with {channels} input channels: it is {kind}. sdlora trains LoRAs on text-to-image "
            "base models (4 input channels); use the matching non-inpainting base model.")


# --- checkpoints: reading and recognising ---------------------------------------------------------

def file_quick_hash(path: Path) -> str:
    """sha256 of the size and the first and last MiB: identifies a multi-GB checkpoint in milliseconds."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:16]


def read_checkpoint_keys(path: Path, *, allow_pickle: bool) -> dict[str, tuple]:
    """Key -> shape of a checkpoint: the safetensors header only; other files are loaded (weights_only unless allowed)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:
            raise ModelLoadError(f"'{path}' is not a valid .safetensors checkpoint ({str(exc).splitlines()[0][:160]}). "
                                 "Download it again or pick another file.") from None
    sd = load_torch_checkpoint(path, allow_pickle=allow_pickle)
    return {k: tuple(v.shape) for k, v in sd.items()}


class _Inert:
    """Stands in for the non-tensor objects old checkpoints pickle next to their weights (training callbacks, numpy
    step counters); it runs nothing and keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# What PyTorch-Lightning training saved beside the weights in the original SD .ckpt files; replaced by _Inert
# rather than imported, so weights_only loading still executes no code from the file.
_BENIGN_GLOBALS = re.compile(r"^(numpy(\._core|\.core)?\.multiarray\.(scalar|_reconstruct)|numpy\.(dtype|ndarray)"
                             r"|numpy\.dtypes\.\w+|(pytorch_lightning|lightning\.pytorch|lightning_fabric)\.[\w.]+)$")


def load_torch_checkpoint(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.bin file, read with torch.load(weights_only=True); full pickle only when allowed."""
    import pickle

    def unreadable(exc) -> ModelLoadError:
        return ModelLoadError(f"'{path}' is not a readable checkpoint ({str(exc).splitlines()[0][:160] or type(exc).__name__}). "
                              "Download it again or pick another file.")

    def refused(names) -> ModelLoadError:
        return ModelLoadError(
            f"'{path}' contains pickled Python objects ({', '.join(names[:3])}) that safe loading refuses: pickle can run "
            "arbitrary code. Convert the file to .safetensors, or, only if you trust its source, pass --allow-pickle "
            "(allow_pickle=True).")

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        unsafe = None  # not a zip checkpoint: the legacy format, or not a checkpoint at all
    others = [n for n in unsafe or () if not _BENIGN_GLOBALS.match(n)]
    try:
        if others:
            if not allow_pickle:
                raise refused(others)
            log.warning("Loading '%s' with full pickle (--allow-pickle): only do this for files you trust.", path)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([(_Inert, n) for n in unsafe or ()]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=unsafe is not None)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        if not found:
            raise unreadable(exc) from None
        if not allow_pickle:
            raise refused(found) from None
        log.warning("Loading '%s' with full pickle (--allow-pickle): only do this for files you trust.", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise unreadable(exc) from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"'{path}' does not hold a state dict: it is not a Stable Diffusion checkpoint. " + SUPPORTED)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read_state_dict(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"'{path}' could not be read ({str(exc).splitlines()[0][:160]}). "
                                 "Download it again or pick another file.") from None
    return load_torch_checkpoint(path, allow_pickle=allow_pickle)


_UNET = "model.diffusion_model."
_CONV_IN = _UNET + "input_blocks.0.0.weight"
_ATTN2_K = _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def checkpoint_family(keys: dict[str, tuple], path: Path) -> str:
    """'sd1' | 'sd2' from an original-layout checkpoint's key names and shapes; a clear ModelLoadError for anything
    sdlora cannot use as a base model (LoRA, SDXL, Flux/SD3, VAE-only, inpainting, incomplete files)."""
    name = path.name
    names = list(keys)
    if not names:
        raise ModelLoadError(f"'{name}' holds no tensors: it is not a Stable Diffusion checkpoint. " + SUPPORTED)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k or ".lora_A." in k
           or ".lora.down." in k for k in names):
        raise ModelLoadError(f"'{name}' is a LoRA, not a base model. Use it with --lora (generate), and pick a full "
                             "SD1.x/SD2.x checkpoint as the base model.")
    if any(k.startswith("conditioner.embedders.") for k in names):
        raise ModelLoadError(f"'{name}' is an SDXL checkpoint: SDXL models are not supported yet. " + SUPPORTED)
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
    if any(k.startswith("cond_stage_model.model.") for k in names):
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
        context = keys.get(_ATTN2_K, (0, 0))[-1]
        want = 768 if family == "sd1" else 1024
        if context != want:
            raise ModelLoadError(f"'{name}' mixes a {family.upper()} text encoder with a UNet for {context}-wide text "
                                 "embeddings: unsupported architecture. " + SUPPORTED)
    return family


def detect_architecture(keys: dict[str, tuple], path: Path) -> str:
    """'sd15' | 'sd2' for the real sizes, 'tiny' for builtin:tiny's, 'custom' for other sizes (needs config_dir)."""
    family = checkpoint_family(keys, path)
    channels = keys[_CONV_IN][0]
    if channels == 320:
        return "sd15" if family == "sd1" else "sd2"
    tiny_channels = 32  # builtin:tiny's block_out_channels[0]
    return "tiny" if channels == tiny_channels and family == "sd1" else "custom"


# --- loading --------------------------------------------------------------------------------------

def _check_complete(module, path: Path, part: str) -> None:
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"'{path.name}' lacks weights for the {part} ({len(missing)} tensors, e.g. {missing[0]}): "
                             "the file is incomplete or of an unsupported variant. " + SUPPORTED)


@torch.no_grad()
def predicts_v(unet) -> bool:
    """Whether an SD2 UNet was trained for v-prediction, from one forward pass at the last timestep on a constant
    input: an epsilon model returns about the input there, a v model about its negative (the check AUTOMATIC1111
    uses for SD2 checkpoints that come without a config)."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    cond = torch.full((1, 2, _context_dim(unet.config)), 0.5, dtype=p.dtype, device=p.device)
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return (out - x).float().mean().item() < -1


def _with_text_model_prefix(state: dict) -> dict:
    """Some SD1 merges were saved with an older transformers layout, `cond_stage_model.transformer.embeddings.*`
    without `text_model.`; diffusers' converter only recognises the newer names."""
    old, new = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."
    if any(k.startswith(new) for k in state) or not any(k.startswith(old) for k in state):
        return state
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


def _load_single_file(path: Path, *, dtype, allow_pickle: bool, prediction_type: str | None, config_dir) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    if path.suffix.lower() == ".safetensors":
        arch = detect_architecture(read_checkpoint_keys(path, allow_pickle=False), path)
        state = _read_state_dict(path, allow_pickle=False)
    else:
        state = _read_state_dict(path, allow_pickle=allow_pickle)
        arch = detect_architecture({k: tuple(v.shape) for k, v in state.items()}, path)
    family = "sd2" if arch == "sd2" or any(k.startswith("cond_stage_model.model.") for k in state) else "sd1"
    if family == "sd1":
        state = _with_text_model_prefix(state)
    variant = None
    if config_dir:
        config = Path(config_dir).expanduser()
        if not (config / "unet" / "config.json").is_file():
            raise ModelLoadError(f"config_dir '{config}' is not a diffusers model folder (no unet/config.json).")
    elif arch == "tiny":
        config = tiny_model_dir()
    elif arch == "custom":
        raise ModelLoadError(f"'{path.name}' is an {family.upper()}-style checkpoint with non-standard sizes (first UNet "
                             f"layer has {state[_CONV_IN].shape[0]} channels, not 320): pass config_dir=<a diffusers "
                             "folder with matching configs>.")
    else:
        # SD2 512-base and 768-v share one layout; loaded with the 768-v configs, then settled by predicts_v below.
        variant = "sd15" if arch == "sd15" else "sd2-v"
        config = config_folder(variant)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_single_file(state, config=str(config), subfolder="unet", local_files_only=True,
                                                         torch_dtype=dtype)
            _check_complete(unet, path, "UNet")
            vae = AutoencoderKL.from_single_file(state, config=str(config), subfolder="vae", local_files_only=True,
                                                 torch_dtype=torch.float32)
            _check_complete(vae, path, "VAE")
            text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder",
                                                                config=str(config), torch_dtype=dtype, local_files_only=True)
            _check_complete(text_encoder, path, "text encoder")
            tokenizer = CLIPTokenizer.from_pretrained(config / "tokenizer", local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load '{path.name}' as an {family.upper()} checkpoint: "
                             f"{str(exc).strip().splitlines()[0][:240]}. " + SUPPORTED) from None
    del state
    scheduler_config = _read_json(config / "scheduler" / "scheduler_config.json")
    resolution = None
    if variant == "sd2-v":
        pred = prediction_type
        if pred is None:
            try:
                pred = "v_prediction" if predicts_v(unet) else "epsilon"
                log.info("'%s': SD2 checkpoint detected as %s; pass prediction_type to override.", path.name, pred)
            except Exception as exc:  # e.g. a dtype the CPU cannot run: fall back to the common SD2 768-v release
                pred = "v_prediction"
                log.warning("'%s': could not test the SD2 prediction type (%s); assuming v_prediction. Pass "
                            "prediction_type='epsilon' for a 512 'base' model.", path.name, exc)
        variant = "sd2-v" if pred == "v_prediction" else "sd2-base"
        unet.register_to_config(sample_size=MODEL_CONFIGS[variant]["unet"]["sample_size"])
        vae.register_to_config(sample_size=MODEL_CONFIGS[variant]["vae"]["sample_size"])
        scheduler_config = MODEL_CONFIGS[variant]["scheduler"]
        resolution = MODEL_CONFIGS[variant]["resolution"]
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler_config": scheduler_config, "family": family, "resolution": resolution}


def _weights_variant(sub: Path) -> str | None:
    """'fp16' when a component folder only has fp16-variant weights (e.g. diffusion_pytorch_model.fp16.safetensors)."""
    names = [f.name for f in sub.iterdir() if f.suffix in (".safetensors", ".bin")] if sub.is_dir() else []
    if not names or any(".fp16." not in n for n in names):
        return None
    return "fp16"


def _load_folder(folder: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_diffusers_folder(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comps = {
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                             variant=_weights_variant(folder / "unet")),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                                     variant=_weights_variant(folder / "vae")),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True,
                                                              variant=_weights_variant(folder / "text_encoder")),
                "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
            }
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the diffusers model in '{folder}': {str(exc).strip().splitlines()[0][:240]}. "
                             "Check that unet/, vae/, text_encoder/, tokenizer/ and scheduler/ are complete.") from None
    comps["scheduler_config"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    return comps


def _folder_hash(folder: Path) -> str:
    """sha256 of the UNet config and the size and first MiB of each UNet weights file."""
    h = hashlib.sha256()
    unet = folder / "unet"
    files = sorted(unet.glob("*.json")) + sorted(f for f in unet.iterdir() if f.suffix in (".safetensors", ".bin"))
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _hub_error(repo_id: str, exc: BaseException) -> ModelLoadError:
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    local = (f"or point --base-model at a local diffusers folder or .safetensors file (e.g. `hf download {repo_id} "
             f"--local-dir models/{repo_id.split('/')[-1]}` on a machine with network, then "
             f"--base-model models/{repo_id.split('/')[-1]}).")
    if "GatedRepoError" in chain:
        return ModelLoadError(f"'{repo_id}' is gated on the Hugging Face hub: accept its license on the model page and log "
                              f"in with `hf auth login`, {local}")
    if "RepositoryNotFoundError" in chain:
        return ModelLoadError(f"'{repo_id}' was not found on the Hugging Face hub. Check the id (owner/name), {local}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = "offline mode: HF_HUB_OFFLINE is set" if offline else "no network?"
    return ModelLoadError(f"Could not download '{repo_id}' from the Hugging Face hub ({why}). Download it once with "
                          f"`hf download {repo_id}` on this machine while it has network, {local}")


def _load_hub(repo_id: str) -> tuple[dict, str]:
    from diffusers import StableDiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index, commit = StableDiffusionPipeline.load_config(repo_id, return_commit_hash=True)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ModelLoadError(f"'{repo_id}' is an SDXL model: SDXL models are not supported yet. " + SUPPORTED)
    if "unet" not in index:
        raise ModelLoadError(f"'{repo_id}' is a {index.get('_class_name', 'non-UNet')} model, not Stable Diffusion "
                             "1.x/2.x. " + SUPPORTED)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = StableDiffusionPipeline.from_pretrained(repo_id, safety_checker=None, requires_safety_checker=False)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    if pipe.unet.config.in_channels != 4:
        raise ModelLoadError(_in_channels_message(f"'{repo_id}'", pipe.unet.config.in_channels))
    comps = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
             "scheduler_config": dict(pipe.scheduler.config)}
    return comps, hashlib.sha256(f"{repo_id}@{commit}".encode()).hexdigest()[:16]


def _family_from_unet(unet) -> str:
    """SD2 conditions on 1024-wide OpenCLIP embeddings, SD1 on 768-wide CLIP ones; other (test-sized) models are told
    apart by SD2's linear attention projections."""
    dim = _context_dim(unet.config)
    if dim in (768, 1024):
        return "sd1" if dim == 768 else "sd2"
    return "sd2" if unet.config.use_linear_projection else "sd1"


def _finish(comps: dict, *, spec: str, kind: str, name: str, model_hash: str, prediction_type: str | None,
            dtype: torch.dtype) -> BaseModel:
    from diffusers import DDPMScheduler

    unet, vae, te = comps["unet"], comps["vae"], comps["text_encoder"]
    sched_cfg = comps["scheduler_config"]
    pred = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    # The training scheduler: DDPM with the model's betas; the sampling ones are derived from it in make_pipeline.
    keep = {k: v for k, v in sched_cfg.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                         "trained_betas", "steps_offset", "timestep_spacing",
                                                         "rescale_betas_zero_snr")}
    noise = DDPMScheduler(**keep, prediction_type=pred, clip_sample=False)
    # The VAE stays in float32: SD's VAE overflows in fp16, and it only runs to encode/decode.
    for module, want in ((unet, dtype), (te, dtype), (vae, torch.float32)):
        if module.dtype != want:
            module.to(dtype=want)
        module.eval()
    resolution = comps.get("resolution") or int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=comps["tokenizer"], noise_scheduler=noise,
                     family=comps.get("family") or _family_from_unet(unet), prediction_type=pred, source=spec, kind=kind,
                     default_resolution=resolution, model_hash=model_hash, name=name)


# Building torch modules is not thread-safe: diffusers loads weights inside accelerate's init_empty_weights(),
# which patches nn.Module globally, so a model built in another thread at the same moment gets parameters on the
# "meta" device. Every model load, and every LoRA injection into a shared model, holds this lock.
MODEL_LOCK = threading.RLock()


def load_base_model(spec: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                    prediction_type: str | None = None, config_dir: str | os.PathLike | None = None) -> BaseModel:
    with MODEL_LOCK:
        return _load_base_model(spec, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                config_dir=config_dir)


def _load_base_model(spec: str, *, dtype: torch.dtype, allow_pickle: bool, prediction_type: str | None,
                     config_dir: str | os.PathLike | None) -> BaseModel:
    """Load a base model offline. `spec`: builtin:tiny, a diffusers folder, a single .safetensors/.ckpt file in the
    original SD layout, or a hub id. UNet and text encoder are cast to `dtype`, the VAE stays float32.
    `prediction_type` overrides what the model's config says (or, for SD2 single files, what a test pass finds).
    `allow_pickle` lets a .ckpt with arbitrary pickled objects load (runs code from the file: trusted files only).
    `config_dir`: for single files of non-standard sizes, a diffusers folder whose configs and tokenizer match."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)} (or unset for the model's own), "
                             f"not '{prediction_type}'.")
    kind, location = resolve_model_spec(spec)
    common = {"spec": spec, "kind": kind, "prediction_type": prediction_type, "dtype": dtype}
    if kind == "builtin":
        return _finish(_load_folder(tiny_model_dir()), name=TINY_SPEC, model_hash=TINY_VERSION, **common)
    if kind == "folder":
        folder = Path(location)
        return _finish(_load_folder(folder), name=folder.name, model_hash=_folder_hash(folder), **common)
    if kind == "single_file":
        path = Path(location)
        comps = _load_single_file(path, dtype=dtype, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                  config_dir=config_dir)
        return _finish(comps, name=path.stem, model_hash=file_quick_hash(path), **common)
    comps, model_hash = _load_hub(location)
    return _finish(comps, name=location, model_hash=model_hash, **common)
