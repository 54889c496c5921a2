"""Load a base model — built-in tiny model, diffusers folder, single-file checkpoint or hub id — offline by default."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import atomic_path
from .model_configs import MODEL_CONFIGS, bytes_to_unicode, write_config_folder, write_tokenizer
from .paths import cache_dir

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    pass


@dataclass
class BaseModel:
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    family: str
    prediction_type: str
    source: str
    kind: str
    default_resolution: int
    model_hash: str
    name: str

    def make_pipeline(self, *, unet=None, text_encoder=None, scheduler: str = "euler_a"):
        """A StableDiffusionPipeline sharing this model's modules (or the given LoRA-carrying ones)."""
        from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                               EulerDiscreteScheduler, StableDiffusionPipeline)

        classes = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
                   "dpm++": DPMSolverMultistepScheduler}
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
            for a, b in zip(word, word[1:]):
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
    """Write the tiny SD1-shaped model as a diffusers folder. Fixed seed: the same weights every time."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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


# --- resolving and loading ------------------------------------------------------------------------

def resolve_model_spec(spec: str) -> tuple[str, str]:
    """Classify a base-model spec without loading anything: (kind, location)."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelLoadError("base_model: no base model given. Use builtin:tiny, a diffusers folder, a .safetensors file or a hub id.")
    if spec.startswith("builtin:"):
        if spec != TINY_SPEC:
            raise ModelLoadError(f"Unknown built-in model '{spec}'. The built-in model is {TINY_SPEC}.")
        return "builtin", str(cache_dir() / TINY_VERSION)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return "folder", str(path)
        raise ModelLoadError(f"Base model folder '{path}' has no model_index.json or unet/ folder: it is not a diffusers model. "
                             "Point at a diffusers folder or a single .safetensors checkpoint.")
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(f"Base model '{path}' is not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)}).")
        return "single_file", str(path)
    looks_like_path = spec.startswith((".", "~", "/")) or spec.count("/") > 1 or "\\" in spec \
        or path.suffix.lower() in CHECKPOINT_SUFFIXES
    if not looks_like_path and _HUB_ID.match(spec):
        return "hub", spec
    raise ModelLoadError(f"Base model '{spec}' not found: no such file or folder. Check the path, or use builtin:tiny.")


def _family_of(unet, text_encoder) -> str:
    dim = int(unet.config.cross_attention_dim if not isinstance(unet.config.cross_attention_dim, (list, tuple)) else unet.config.cross_attention_dim[0])
    return "sd2" if dim == 1024 else "sd1"


def _finish(components: dict, *, spec: str, kind: str, name: str, model_hash: str, prediction_type: str | None,
            default_resolution: int | None = None, dtype=torch.float32) -> BaseModel:
    from diffusers import DDPMScheduler

    unet, vae, te = components["unet"], components["vae"], components["text_encoder"]
    family = _family_of(unet, te)
    sched_cfg = dict(components["scheduler"].config)
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    # The training scheduler: DDPM with the model's betas; the sampling ones are derived in make_pipeline.
    keep = {k: v for k, v in sched_cfg.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                            "trained_betas", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")}
    noise = DDPMScheduler(**keep, prediction_type=pred, clip_sample=False)
    for m in (unet, vae, te):
        want = dtype if m is not vae else torch.float32
        if m.dtype != want:
            m.to(dtype=want)
        m.eval()
    if default_resolution is None:
        default_resolution = int(unet.config.sample_size) * 8
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=components["tokenizer"], noise_scheduler=noise, family=family,
                     prediction_type=pred, source=spec, kind=kind, default_resolution=default_resolution, model_hash=model_hash,
                     name=name)


def _load_folder(folder: Path) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
            raise ModelLoadError(f"'{folder}' is an SDXL model. SDXL base models are not supported yet; use an SD1.x or SD2.x model.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            sched_cls = getattr(diffusers, sched_cfg.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
            return {
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
                "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
                "scheduler": sched_cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
            }
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Could not load the diffusers model in '{folder}': {exc}. Check that unet/, vae/, text_encoder/, "
                             "tokenizer/ and scheduler/ are complete.") from None


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((folder / "unet").glob("*.json")) + sorted((folder / "unet").glob("*.safetensors"))[:1]:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


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
    """Key -> shape of a checkpoint, reading safetensors headers only; .ckpt via weights_only unless allowed."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:
            raise ModelLoadError(f"'{path}' is not a valid .safetensors checkpoint ({exc}). Download it again or pick another file.") from None
    sd = load_torch_checkpoint(path, allow_pickle=allow_pickle)
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def load_torch_checkpoint(path: Path, *, allow_pickle: bool) -> dict:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise ModelLoadError(
                f"'{path}' contains pickled Python objects that safe loading refuses ({str(exc).splitlines()[0][:120]}). "
                "Pickle can run arbitrary code: convert the file to .safetensors, or, only if you trust its source, pass "
                "--allow-pickle.") from None
        log.warning("Loading '%s' with full pickle (--allow-pickle): only do this for files you trust.", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(f"'{path}' is not a readable checkpoint ({str(exc).splitlines()[0][:160]}).") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"'{path}' does not hold a state dict; it is not a Stable Diffusion checkpoint.")
    return obj


def detect_architecture(keys: dict[str, tuple], path: Path) -> str:
    """'sd15' | 'sd2' | 'tiny' from key names and shapes; a clear error for anything else."""
    names = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or ".lora_down." in k or ".lora_A." in k for k in names):
        raise ModelLoadError(f"'{path.name}' is a LoRA, not a base model. Use it with --lora (generate) and pick a full checkpoint as base model.")
    if any(k.startswith("conditioner.embedders.") for k in names):
        raise ModelLoadError(f"'{path.name}' is an SDXL checkpoint. SDXL base models are not supported yet; use an SD1.x or SD2.x checkpoint.")
    if not any(k.startswith("model.diffusion_model.") for k in names):
        if any(k.startswith(("double_blocks.", "transformer_blocks.", "joint_blocks.")) for k in names):
            raise ModelLoadError(f"'{path.name}' is a transformer-based model (Flux/SD3); sdlora supports SD1.x and SD2.x.")
        raise ModelLoadError(f"'{path.name}' has no Stable Diffusion UNet weights (no model.diffusion_model.* keys): it is not an "
                             "SD1.x/SD2.x checkpoint. Supported: SD1.x and SD2.x single files and diffusers folders.")
    conv_in = keys.get("model.diffusion_model.input_blocks.0.0.weight", (0,))
    if conv_in[0] == 32:
        return "tiny"
    if conv_in[0] != 320:
        raise ModelLoadError(f"'{path.name}' has an unsupported UNet layout (first conv has {conv_in[0]} channels); supported: SD1.x, SD2.x.")
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    return "sd15"


def _load_single_file(path: Path, *, allow_pickle: bool, prediction_type: str | None, config_dir: str | None):
    from diffusers import StableDiffusionPipeline

    arch = detect_architecture(read_checkpoint_keys(path, allow_pickle=allow_pickle), path)
    resolution = None
    if config_dir:
        config = Path(config_dir)
    elif arch == "tiny":
        config = tiny_model_dir()
    elif arch == "sd2":
        # SD2 checkpoints do not say whether they are the 768 v-prediction or the 512 epsilon ("base") model.
        name = path.name.lower()
        variant = "sd2-base" if ("base" in name or "512" in name) and prediction_type != "v_prediction" else "sd2-v"
        if prediction_type == "epsilon":
            variant = "sd2-base"
        config = write_config_folder(variant, cache_dir() / "configs" / variant)
        resolution = MODEL_CONFIGS[variant]["resolution"]
    else:
        config = write_config_folder("sd15", cache_dir() / "configs" / "sd15")
    source = path
    if path.suffix.lower() != ".safetensors" and allow_pickle:
        source = _pickle_to_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_single_file(str(source), config=str(config), local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Could not load '{path.name}' as an SD checkpoint: {str(exc).splitlines()[0][:200]}") from None
    comps = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "scheduler": pipe.scheduler}
    return comps, resolution


def _pickle_to_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    target = cache_dir() / "converted" / f"{path.stem}-{file_quick_hash(path)}.safetensors"
    if not target.is_file():
        sd = load_torch_checkpoint(path, allow_pickle=True)
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, str(tmp))
    return target


def _load_hub(repo_id: str) -> dict:
    from diffusers import StableDiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(repo_id, safety_checker=None, requires_safety_checker=False)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "offline mode (HF_HUB_OFFLINE is set)" if offline else f"{type(exc).__name__}"
        raise ModelLoadError(
            f"Could not download '{repo_id}' from the Hugging Face hub ({why}; no network?). Download it once with "
            f"`huggingface-cli download {repo_id}` on a machine with network, or point --base-model at a local diffusers "
            "folder or .safetensors file.") from None
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ModelLoadError(f"'{repo_id}' is an SDXL model. SDXL base models are not supported yet.")
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "scheduler": pipe.scheduler}


def load_base_model(spec: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                    prediction_type: str | None = None, config_dir: str | None = None) -> BaseModel:
    kind, location = resolve_model_spec(spec)
    if kind == "builtin":
        folder = tiny_model_dir()
        return _finish(_load_folder(folder), spec=spec, kind=kind, name=TINY_SPEC, model_hash=TINY_VERSION,
                       prediction_type=prediction_type, default_resolution=64, dtype=dtype)
    if kind == "folder":
        folder = Path(location)
        return _finish(_load_folder(folder), spec=spec, kind=kind, name=folder.name, model_hash=_folder_hash(folder),
                       prediction_type=prediction_type, dtype=dtype)
    if kind == "single_file":
        path = Path(location)
        comps, resolution = _load_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type, config_dir=config_dir)
        return _finish(comps, spec=spec, kind=kind, name=path.stem, model_hash=file_quick_hash(path),
                       prediction_type=prediction_type, default_resolution=resolution, dtype=dtype)
    comps = _load_hub(location)
    return _finish(comps, spec=spec, kind=kind, name=location, model_hash=hashlib.sha256(location.encode()).hexdigest()[:16],
                   prediction_type=prediction_type, dtype=dtype)
