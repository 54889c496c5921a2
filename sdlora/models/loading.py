"""Loading a base model (built-in, diffusers folder, single-file checkpoint, hub id) into its components."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..families import FAMILIES, ModelFamily, cross_attention_width, family_of_folder
from .checkpoint_files import file_quick_hash, read_checkpoint_keys, read_state_dict
from .common import MODEL_LOCK, PREDICTION_TYPES, SUPPORTED, ModelLoadError, in_channels_message, read_json
from .component_configs import MODEL_CONFIGS, config_folder
from .recognise import CONV_IN, check_diffusers_folder, checkpoint_family, detect_architecture, resolve_model_spec
from .tiny import BUILTIN_MODELS, tiny_model_dir

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        UNet2DConditionModel,
    )

log = logging.getLogger(__name__)

SAMPLERS = ("euler_a", "euler", "ddim", "dpm++")


@dataclass
class BaseModel:
    """A loaded base model: its family and components. Text encoders and tokenizers are in the family's order
    (one for SD1/SD2, two for SDXL); an entry is None once a run has dropped a frozen encoder."""

    family: ModelFamily
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list
    tokenizers: list
    noise_scheduler: DDPMScheduler      # the training scheduler, prediction_type set
    prediction_type: str                # "epsilon" | "v_prediction"
    source: str                         # the spec as given
    kind: str                           # "builtin" | "folder" | "single_file" | "hub"
    default_resolution: int             # 512 sd1 / sd2-base, 768 sd2-v, 1024 sdxl, 64 builtin:tiny
    model_hash: str                     # short id of the base weights (cheap: not a full-file hash)
    name: str                           # file stem, folder name, hub id or builtin:tiny

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def components(self) -> dict[str, torch.nn.Module]:
        """name -> module for the UNet and each text encoder still loaded (the parts a LoRA can adapt)."""
        out = {"unet": self.unet}
        out.update({n: m for n, m in zip(self.family.text_encoder_names, self.text_encoders) if m is not None})
        return out

    def make_pipeline(self, scheduler: str = "euler_a", *, unet=None, text_encoders: list | None = None,
                      scheduler_config=None):
        """The family's pipeline sharing this model's modules (or the given LoRA-carrying ones); no safety checker.
        The sampling scheduler is derived from the training scheduler's config (or `scheduler_config`, a run's own),
        so betas and prediction type match."""
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
            EulerDiscreteScheduler,
        )

        classes = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
                   "dpm++": DPMSolverMultistepScheduler}
        if scheduler not in classes:
            raise ValueError(f"Unknown sampler '{scheduler}'. Choose one of: {', '.join(SAMPLERS)}.")
        sched = classes[scheduler].from_config(scheduler_config or self.noise_scheduler.config)
        encoders = list(text_encoders) if text_encoders is not None else list(self.text_encoders)
        return self.family.pipeline(unet=unet or self.unet, vae=self.vae, text_encoders=encoders,
                                    tokenizers=self.tokenizers, scheduler=sched)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for an error sentence."""
    lines = str(exc).strip().splitlines()
    return lines[0][:240] if lines else type(exc).__name__


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
    cond = torch.full((1, 2, cross_attention_width(unet.config)), 0.5, dtype=p.dtype, device=p.device)
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return (out - x).float().mean().item() < -1


def _load_single_file(path: Path, *, dtype, allow_pickle: bool, prediction_type: str | None, config_dir) -> dict:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTokenizer

    if path.suffix.lower() == ".safetensors":
        keys = read_checkpoint_keys(path, allow_pickle=False)  # the header first: refuse before reading gigabytes
        arch = detect_architecture(keys, path)
        state = read_state_dict(path, allow_pickle=False)
    else:
        state = read_state_dict(path, allow_pickle=allow_pickle)
        keys = {k: tuple(v.shape) for k, v in state.items()}
        arch = detect_architecture(keys, path)
    family = checkpoint_family(keys, path)
    state = family.prepare_checkpoint(state)
    variant = None
    if config_dir:
        config = Path(config_dir).expanduser()
        if not (config / "unet" / "config.json").is_file():
            raise ModelLoadError(f"config_dir '{config}' is not a diffusers model folder (no unet/config.json).")
        index = read_json(config / "model_index.json") if (config / "model_index.json").is_file() else {}
        config_family = family_of_folder(index, read_json(config / "unet" / "config.json")) or FAMILIES["sd1"]
        # A different number of text encoders is never loadable; other mismatches fail on the weights' shapes.
        if len(config_family.text_encoder_names) != len(family.text_encoder_names):
            raise ModelLoadError(f"config_dir '{config}' holds an {config_family.label} model, but '{path.name}' is an "
                                 f"{family.label} checkpoint: pass a diffusers folder of the same family and sizes.")
    elif f"builtin:{arch}" in BUILTIN_MODELS:  # the sizes of a built-in tiny model: its folder has the configs
        config = tiny_model_dir(f"builtin:{arch}")
    elif arch == "custom":
        raise ModelLoadError(f"'{path.name}' is an {family.label}-style checkpoint with non-standard sizes (first UNet "
                             f"layer has {state[CONV_IN].shape[0]} channels, not 320): pass config_dir=<a diffusers "
                             "folder with matching configs>.")
    else:
        variant = family.single_file_configs
        config = config_folder(variant)
    stage = "UNet"  # the part being loaded, for the error sentence
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = UNet2DConditionModel.from_single_file(state, config=str(config), subfolder="unet", local_files_only=True,
                                                         torch_dtype=dtype)
            _check_complete(unet, path, stage)
            stage = "VAE"
            vae = AutoencoderKL.from_single_file(state, config=str(config), subfolder="vae", local_files_only=True,
                                                 torch_dtype=torch.float32)
            _check_complete(vae, path, stage)
            text_encoders = []
            for i, part in enumerate(family.text_encoder_names):
                stage = f"text encoder {i + 1}" if len(family.text_encoder_names) > 1 else "text encoder"
                cls = getattr(transformers, family.text_encoder_classes[i])
                te = create_diffusers_clip_model_from_ldm(cls, state, subfolder=part, config=str(config), torch_dtype=dtype,
                                                          local_files_only=True)
                _check_complete(te, path, stage)
                text_encoders.append(te)
            stage = "tokenizer"
            tokenizers = [CLIPTokenizer.from_pretrained(config / part, local_files_only=True) for part in family.tokenizer_names]
    except ModelLoadError:
        raise
    except Exception as exc:
        # diffusers' converters index the tensors they need (KeyError), and a model left with weights the file lacks
        # fails when diffusers moves it off the meta device: both mean an incomplete file, not a diffusers problem.
        if isinstance(exc, KeyError) or "meta tensor" in str(exc):
            example = f" (e.g. {exc.args[0]})" if isinstance(exc, KeyError) and exc.args else ""
            raise ModelLoadError(f"'{path.name}' lacks weights for the {stage}{example}: the file is incomplete or of an "
                                 "unsupported variant. " + SUPPORTED) from None
        raise ModelLoadError(f"Could not load '{path.name}' as an {family.label} checkpoint ({stage}): "
                             f"{_first_line(exc)}. " + SUPPORTED) from None
    del state
    scheduler_config = read_json(config / "scheduler" / "scheduler_config.json")
    resolution = None
    if variant and family.configs_by_prediction:
        pred = prediction_type
        if pred is None:
            what = family.name.upper()
            try:
                pred = "v_prediction" if predicts_v(unet) else "epsilon"
                log.info("'%s': %s checkpoint detected as %s; pass prediction_type to override.", path.name, what, pred)
            except Exception as exc:  # e.g. a dtype the CPU cannot run: fall back to the configs' own (SD2: 768-v)
                pred = MODEL_CONFIGS[variant]["scheduler"]["prediction_type"]
                log.warning("'%s': could not test the %s prediction type (%s); assuming %s. Pass "
                            "prediction_type='epsilon' for a 512 'base' model.", path.name, what, exc, pred)
        variant = family.configs_by_prediction[pred]
        unet.register_to_config(sample_size=MODEL_CONFIGS[variant]["unet"]["sample_size"])
        vae.register_to_config(sample_size=MODEL_CONFIGS[variant]["vae"]["sample_size"])
        scheduler_config = MODEL_CONFIGS[variant]["scheduler"]
        resolution = MODEL_CONFIGS[variant]["resolution"]
    return {"unet": unet, "vae": vae, "text_encoders": text_encoders, "tokenizers": tokenizers,
            "scheduler_config": scheduler_config, "family": family, "resolution": resolution}


def _weights_variant(sub: Path) -> str | None:
    """'fp16' when a component folder only has fp16-variant weights (e.g. diffusion_pytorch_model.fp16.safetensors)."""
    names = [f.name for f in sub.iterdir() if f.suffix in (".safetensors", ".bin")] if sub.is_dir() else []
    if not names or any(".fp16." not in n for n in names):
        return None
    return "fp16"


def _load_folder(folder: Path) -> dict:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    family = check_diffusers_folder(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comps = {
                "family": family,
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                             variant=_weights_variant(folder / "unet")),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                                     variant=_weights_variant(folder / "vae")),
                "text_encoders": [getattr(transformers, cls).from_pretrained(
                    folder, subfolder=part, local_files_only=True, variant=_weights_variant(folder / part))
                    for part, cls in zip(family.text_encoder_names, family.text_encoder_classes)],
                "tokenizers": [CLIPTokenizer.from_pretrained(folder, subfolder=part, local_files_only=True)
                               for part in family.tokenizer_names],
            }
    except (OSError, ValueError, TypeError, KeyError) as exc:
        parts = ", ".join(f"{p}/" for p in ("unet", "vae", *family.text_encoder_names, *family.tokenizer_names))
        raise ModelLoadError(f"Could not load the diffusers model in '{folder}': {_first_line(exc)}. "
                             f"Check that {parts} and scheduler/ are complete.") from None
    comps["scheduler_config"] = read_json(folder / "scheduler" / "scheduler_config.json")
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
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index, commit = DiffusionPipeline.load_config(repo_id, return_commit_hash=True)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    if "unet" not in index:
        raise ModelLoadError(f"'{repo_id}' is a {index.get('_class_name', 'non-UNet')} model, not Stable Diffusion "
                             "1.x/2.x/XL. " + SUPPORTED)
    if "Refiner" in str(index.get("_class_name", "")):
        raise ModelLoadError(f"'{repo_id}' is the SDXL refiner: train LoRAs on the SDXL base model. " + SUPPORTED)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = DiffusionPipeline.from_pretrained(repo_id, safety_checker=None, requires_safety_checker=False)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    if pipe.unet.config.in_channels != 4:
        raise ModelLoadError(in_channels_message(f"'{repo_id}'", pipe.unet.config.in_channels))
    family = family_of_folder(index, dict(pipe.unet.config)) or FAMILIES["sd1"]
    comps = {"family": family, "unet": pipe.unet, "vae": pipe.vae,
             "text_encoders": [getattr(pipe, n) for n in family.text_encoder_names],
             "tokenizers": [getattr(pipe, n) for n in family.tokenizer_names], "scheduler_config": dict(pipe.scheduler.config)}
    return comps, hashlib.sha256(f"{repo_id}@{commit}".encode()).hexdigest()[:16]


def _finish(comps: dict, *, spec: str, kind: str, name: str, model_hash: str, prediction_type: str | None,
            dtype: torch.dtype) -> BaseModel:
    from diffusers import DDPMScheduler

    unet, vae, encoders = comps["unet"], comps["vae"], comps["text_encoders"]
    sched_cfg = comps["scheduler_config"]
    pred = prediction_type or sched_cfg.get("prediction_type") or "epsilon"
    # The training scheduler: DDPM with the model's betas; the sampling ones are derived from it in make_pipeline.
    keep = {k: v for k, v in sched_cfg.items() if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                                         "trained_betas", "steps_offset", "timestep_spacing",
                                                         "rescale_betas_zero_snr")}
    noise = DDPMScheduler(**keep, prediction_type=pred, clip_sample=False)
    # The VAE stays in float32: SD's (and SDXL's) VAE overflows in fp16, and it only runs to encode/decode.
    for module, want in ((unet, dtype), *((te, dtype) for te in encoders), (vae, torch.float32)):
        if module.dtype != want:
            module.to(dtype=want)
        module.eval()
    resolution = comps.get("resolution") or int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return BaseModel(family=comps["family"], unet=unet, vae=vae, text_encoders=list(encoders),
                     tokenizers=list(comps["tokenizers"]), noise_scheduler=noise, prediction_type=pred, source=spec,
                     kind=kind, default_resolution=resolution, model_hash=model_hash, name=name)




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
        return _finish(_load_folder(tiny_model_dir(spec.strip())), name=spec.strip(), model_hash=BUILTIN_MODELS[spec.strip()],
                       **common)
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
