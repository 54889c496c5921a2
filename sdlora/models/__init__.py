"""Load a base model — built-in tiny model, diffusers folder, single-file checkpoint or hub id — offline by default.

Single-file checkpoints in the original (LDM/CompVis/SGM) layout carry weights only. sdlora supplies what they lack:
the component configs of SD1.5, SD2 and SDXL (`component_configs.py`) and CLIP's tokenizer, built from the vendored
BPE vocabulary (`assets/`). They are written once into the cache and passed to diffusers' single-file converters with
`local_files_only=True`, so a downloaded `.safetensors` loads with no hub access. What differs between model
families (which keys a file needs, which configs it loads with) is asked of the family (sdlora.families).

  common.py            the user-facing error, the model-load lock, what a hub id looks like
  component_configs.py the shipped component configs and the config folders written from them
  tokenizers.py        CLIP tokenizers written as files (the real vocabulary, small learned ones)
  tiny.py              the built-in tiny models (builders, cache)
  toy.py               builtin:toy, trained on simple scenes: shipped weights, hash check, unpacking
  checkpoint_files.py  safe reading of .safetensors/.ckpt files
  recognise.py         what a spec is, without loading weights
  loading.py           loading into a BaseModel
"""

from .checkpoint_files import file_quick_hash, load_torch_checkpoint, read_checkpoint_keys
from .common import CHECKPOINT_SUFFIXES, MODEL_LOCK, PREDICTION_TYPES, SUPPORTED, ModelLoadError, quiet_libraries
from .loading import SAMPLERS, BaseModel, load_base_model, predicts_v
from .recognise import check_diffusers_folder, checkpoint_family, detect_architecture, resolve_model_spec
from .tiny import BUILTIN_MODELS, TINY_SPEC, TINY_VERSION, TINY_XL_SPEC, build_tiny_model, build_tiny_xl_model, tiny_model_dir

quiet_libraries()

__all__ = ["BUILTIN_MODELS", "TINY_XL_SPEC", "build_tiny_xl_model", "BaseModel", "CHECKPOINT_SUFFIXES", "MODEL_LOCK", "ModelLoadError", "PREDICTION_TYPES", "SAMPLERS", "SUPPORTED",
           "TINY_SPEC", "TINY_VERSION", "build_tiny_model", "check_diffusers_folder", "checkpoint_family",
           "detect_architecture", "file_quick_hash", "load_base_model", "load_torch_checkpoint", "predicts_v",
           "read_checkpoint_keys", "resolve_model_spec", "tiny_model_dir"]
