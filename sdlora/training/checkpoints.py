"""Training checkpoints: LoRA weights + optimizer + scheduler + step, written atomically.

Only the small trainable state is saved (never the frozen base), so a checkpoint of an SD1.5 LoRA is
megabytes, not gigabytes. Optimizer state loads with `weights_only=True`: no pickle from disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters.layers import adapter_state_dict, load_adapter_state_dict
from ..fileio import read_user_bytes

CHECKPOINT_DIR = "checkpoints"  # OUTPUT/checkpoints/stepNNNNNN
STEP_DIR = re.compile(r"^step(\d{6,})$")
KEEP_CHECKPOINTS = 3


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, step: int, *, modules: dict, optimizer, scheduler, config, export=None) -> Path:
    """Write into a temp folder and rename it into place: a kill at any moment leaves either the old set or the new one."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step{step:06d}.", dir=root))
    try:
        # One prefix per adapted component: unet., text_encoder., text_encoder_2.
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
                   for name, module in modules.items() for k, v in adapter_state_dict(module).items()}
        save_file(tensors, tmp / "lora_state.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "training_state.pt")
        if export is not None:
            export(tmp / "lora.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config.model_dump()}, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, modules: dict, optimizer, scheduler) -> dict:
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"'{path}' is not an sdlora checkpoint (no state.json). Pick a folder under OUTPUT/{CHECKPOINT_DIR}/.")
    state = json.loads(read_user_bytes(state_file).decode("utf-8"))
    tensors = load_file(path / "lora_state.safetensors")
    for name, module in modules.items():
        load_adapter_state_dict(module, {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    training = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    torch.set_rng_state(training["torch_rng"])
    return state
