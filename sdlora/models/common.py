"""What every loading module shares: the user-facing error, the supported list, the model-load lock, what a hub id
and a checkpoint file look like."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from ..errors import UserError
from ..fileio import read_user_bytes


def quiet_libraries() -> None:
    """Loading bars and config notices from diffusers/transformers drown sdlora's own progress output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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


def hub_id_shaped(spec: str) -> bool:
    """owner/name without path markers or a checkpoint suffix: what the loader takes for a hub id once no file or
    folder of that name exists."""
    spec = spec.strip()
    return bool(HUB_ID.match(spec)) and Path(spec).suffix.lower() not in CHECKPOINT_SUFFIXES


def read_json(path: Path) -> dict:
    try:
        return json.loads(read_user_bytes(path).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read '{path}': {exc}. The model folder looks damaged; download it again.") from None



def in_channels_message(what: str, channels: int) -> str:
    kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-conditioned model"}.get(channels, "not a text-to-image model")
    return (f"{what} has a UNet with {channels} input channels: it is {kind}. sdlora trains LoRAs on text-to-image "
            "base models (4 input channels); use the matching non-inpainting base model.")

