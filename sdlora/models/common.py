"""What every loading module shares: the user-facing error, the supported list, the model-load lock."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..errors import UserError


def quiet_libraries() -> None:
    """Loading bars and config notices from diffusers/transformers drown sdlora's own progress output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SAMPLERS = ("euler_a", "euler", "ddim", "dpm++")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SUPPORTED = ("Supported base models: SD1.x, SD2.x (512 and 768-v) and SDXL (1.0 base and its derivatives), as a "
             "diffusers folder or a single .safetensors/.ckpt checkpoint, or builtin:toy / builtin:tiny / builtin:tiny-xl.")


class ModelLoadError(UserError, ValueError):
    """A base model could not be resolved or loaded; the message is a sentence for the user."""



# Building torch modules is not thread-safe: diffusers loads weights inside accelerate's init_empty_weights(),
# which patches nn.Module globally, so a model built in another thread at the same moment gets parameters on the
# "meta" device. Every model load, and every LoRA injection into a shared model, holds this lock.
MODEL_LOCK = threading.RLock()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read '{path}': {exc}. The model folder looks damaged; download it again.") from None



def _context_dim(unet_cfg) -> int:
    dim = unet_cfg.get("cross_attention_dim", 768) if isinstance(unet_cfg, dict) else unet_cfg.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


def _in_channels_message(what: str, channels: int) -> str:
    kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-conditioned model"}.get(channels, "not a text-to-image model")
    return (f"{what} has a UNet with {channels} input channels: it is {kind}. sdlora trains LoRAs on text-to-image "
            "base models (4 input channels); use the matching non-inpainting base model.")

