"""Reading checkpoint files safely: safetensors headers, weights-only torch.load, quick identity hashes."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch

from .common import SUPPORTED, ModelLoadError

log = logging.getLogger(__name__)


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


def read_state_dict(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"'{path}' could not be read ({str(exc).splitlines()[0][:160]}). "
                                 "Download it again or pick another file.") from None
    return load_torch_checkpoint(path, allow_pickle=allow_pickle)

