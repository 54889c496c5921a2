"""Resume only from a checkpoint that is whole and fits this run.

A checkpoint is read completely and checked before anything is applied to the model or optimizer: state.json parses
and its step matches the folder, lora_state.safetensors holds exactly the LoRA weights this run's model has (same
keys, same shapes, finite numbers), and training_state.pt loads and matches the optimizer's parameters. With
resume=latest a damaged newest checkpoint is skipped for the newest intact one (the caller is told which and why);
an explicit checkpoint that fails gives a sentence naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import read_user_bytes
from ..safetext import shown
from .checkpoints import STEP_DIR, checkpoint_root
_EXACT_SHAPE = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
_PARAM_SHAPED = _EXACT_SHAPE | {"state1", "state2"}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from; the message names it and why."""


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict
    weights: dict[str, dict[str, torch.Tensor]]  # component ("unet", "text_encoder", ...) -> its LoRA state dict
    training: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints passed over, and why


def _expected(model) -> dict[str, torch.Tensor]:
    from ..adapters.layers import adapter_state_dict

    return adapter_state_dict(model)


def _check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], part: str) -> None:
    if not found:
        raise CheckpointError(f"it holds no {part} LoRA weights")
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        detail = f"{len(missing)} missing (e.g. {missing[0]})" if missing else ""
        if extra:
            detail += ("; " if detail else "") + f"{len(extra)} this run does not have (e.g. {extra[0]})"
        raise CheckpointError(f"its {part} LoRA weights are not those of this run's model ({detail}); it was saved with "
                              "other targets or another base model")
    for key, value in found.items():
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape):
            rank_hint = ""
            if ".lora_A." in key and value.dim() >= 1 and want.dim() >= 1:
                rank_hint = f": it was saved with rank {value.shape[0]}, this run has rank {want.shape[0]}"
            raise CheckpointError(f"{part} weight {key} has shape {tuple(value.shape)}, this run expects "
                                  f"{tuple(want.shape)}{rank_hint}")
        if not value.is_floating_point():
            raise CheckpointError(f"{part} weight {key} is {value.dtype}, not a floating-point tensor")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{part} weight {key} holds NaN or infinite values")


def _check_optimizer(saved, optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointError("its optimizer state is not an optimizer state")
    groups = inner.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise CheckpointError(f"its optimizer has {len(saved['param_groups'])} parameter group(s), this run has {len(groups)} "
                              "(was train_text_encoder different?)")
    params = []
    for saved_group, group in zip(saved["param_groups"], groups):
        ids = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            raise CheckpointError("its optimizer state is for a different set of LoRA weights")
        params += list(zip(ids, group["params"]))
    by_id = dict(params)
    for pid, entry in saved["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise CheckpointError("its optimizer state refers to parameters this run does not have")
        for name, value in entry.items():
            # Moment buffers have the weight's shape (bitsandbytes' state1/state2 at least its size); other entries
            # (8-bit quantisation maps, block maxima, Prodigy's scalars) have their own.
            if name not in _PARAM_SHAPED or not isinstance(value, torch.Tensor):
                continue
            if value.numel() != by_id[pid].numel() or (name in _EXACT_SHAPE and tuple(value.shape) != tuple(by_id[pid].shape)):
                raise CheckpointError(f"its optimizer state ({name}) has shape {tuple(value.shape)} where this run's weight has "
                                      f"{tuple(by_id[pid].shape)}")


_PART_NAMES = {"unet": "UNet", "text_encoder": "text-encoder", "text_encoder_2": "second text-encoder"}


def read_checkpoint(path, *, modules: dict, optimizer) -> LoadedCheckpoint:
    """Read and check everything; raises CheckpointError with the reason (without the path). `modules`: component
    name -> the module carrying this run's LoRA (the checkpoint's keys are "<component>.<peft key>")."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("it is not a folder" if path.exists() else "it does not exist")
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError("it has no state.json (not an sdlora checkpoint, or only partly copied)")
    try:
        state = json.loads(read_user_bytes(state_file).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"its state.json is unreadable or not JSON ({type(exc).__name__})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError("its state.json has no valid step number")
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"its state.json says step {step} but the folder is {path.name}")

    lora_file = path / "lora_state.safetensors"
    try:
        tensors = load_file(lora_file)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several unrelated types for a damaged file
        reason = "is missing" if not lora_file.exists() else f"is unreadable ({type(exc).__name__})"
        raise CheckpointError(f"its lora_state.safetensors {reason}") from None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part, dot, rest = key.partition(".")
        weights.setdefault(part if dot else "", {})[rest] = value
    for part in weights:
        if part not in modules:
            if part.startswith("text_encoder"):
                raise CheckpointError("it was saved with train_text_encoder on; this run has it off")
            raise CheckpointError(f"its lora_state.safetensors holds weights this run does not train ({part or 'unnamed'})")
    for part, module in modules.items():
        if part not in weights and part.startswith("text_encoder"):
            raise CheckpointError("it was saved with train_text_encoder off; this run has it on")
        _check_tensors(weights.get(part, {}), _expected(module), _PART_NAMES.get(part, part))

    try:
        training = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError("its training_state.pt is missing") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign pickle raises many types
        raise CheckpointError(f"its training_state.pt is unreadable ({type(exc).__name__})") from None
    if not isinstance(training, dict) or not {"optimizer", "scheduler", "torch_rng"} <= set(training):
        raise CheckpointError("its training_state.pt lacks the optimizer, scheduler or random state")
    _check_optimizer(training["optimizer"], optimizer)
    if not isinstance(training["scheduler"], dict):
        raise CheckpointError("its scheduler state is not a scheduler state")
    rng = training["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise CheckpointError("its random-number state is damaged")
    return LoadedCheckpoint(path=path, step=step, state=state, weights=weights, training=training)


def apply_checkpoint(ckpt: LoadedCheckpoint, *, modules: dict, optimizer, scheduler) -> None:
    from ..adapters.layers import load_adapter_state_dict

    for part, module in modules.items():
        load_adapter_state_dict(module, ckpt.weights[part])
    optimizer.load_state_dict(ckpt.training["optimizer"])
    scheduler.load_state_dict(ckpt.training["scheduler"])
    torch.set_rng_state(ckpt.training["torch_rng"])


def candidates(out_dir) -> list[Path]:
    """Every stepNNNNNN folder under OUT/checkpoints, newest first (damaged ones too: they are reported, not hidden)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def choose_checkpoint(resume: str, out_dir, *, modules: dict, optimizer) -> LoadedCheckpoint:
    """The checkpoint to resume from: `resume` is a folder, or 'latest' for the newest intact one under OUT/checkpoints."""
    out_dir = Path(out_dir)
    if resume.strip() != "latest":
        path = Path(resume).expanduser()
        try:
            return read_checkpoint(path, modules=modules, optimizer=optimizer)
        except CheckpointError as exc:
            raise CheckpointError(f"resume: checkpoint '{shown(path)}' cannot be used: {exc}. Pick another folder under "
                                  f"'{shown(checkpoint_root(out_dir))}', or --resume latest.") from None
    skipped: list[tuple[Path, str]] = []
    for path in candidates(out_dir):
        try:
            ckpt = read_checkpoint(path, modules=modules, optimizer=optimizer)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        ckpt.skipped = skipped
        return ckpt
    root = checkpoint_root(out_dir)
    if not skipped:
        raise CheckpointError(f"resume: no checkpoint found under '{shown(root)}'. Train with --save-every N first.")
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped[:3])
    raise CheckpointError(f"resume: no usable checkpoint under '{shown(root)}' ({reasons}). Start without --resume, or "
                          "resume with the settings the checkpoints were saved with.")
