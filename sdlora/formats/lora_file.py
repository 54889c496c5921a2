"""A LoRA file as the readers see it: read it, tell its layout (kohya/LyCORIS or diffusers/PEFT) and the family it is
for, find what is wrong with it on its own, and map its modules onto a base model's.

Everything that takes a LoRA file in -- inference, verify, convert and the LoRA tools -- starts here; the meaning of a
module's tensors is `sdlora.formats.lycoris`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UserError
from ..families import FAMILIES, family_of_lora
from ..safetext import shown
from . import lycoris
from .kohya_names import DIFFUSERS_COMPONENTS, KOHYA_PREFIXES, KohyaNameError

_SHOW = 8


class LoraFileError(UserError, RuntimeError):
    """A file that cannot be read as a LoRA at all."""


class LoraLoadError(UserError, ValueError):
    """A LoRA file that cannot be used: broken weights or damaged metadata; the message names the file."""


class LoraMismatchError(UserError, ValueError):
    """A LoRA file made for another base model."""


# --- reading ------------------------------------------------------------------------------------------------------
def not_a_file(path) -> str:
    """Why `path` (which is not a regular file) cannot be a LoRA file, as a sentence."""
    path = Path(path)
    if path.is_dir():
        return f"'{shown(path)}' is a folder, not a LoRA file. Give the .safetensors file inside it."
    if path.exists():
        return f"'{shown(path)}' is not a regular file (a device, pipe or socket). Give a .safetensors LoRA file."
    return f"LoRA file '{shown(path)}' not found."


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a sentence naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(not_a_file(path))
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except Exception as exc:  # safetensors raises several unrelated types for a bad header
        raise LoraFileError(f"'{path}' is not a readable .safetensors file ({exc}). Export it again or pick another file.") from None
    return tensors, metadata


def detect_format(tensors: dict) -> str:
    """"kohya" (kohya/LyCORIS names), "diffusers" (PEFT names) or "unknown", from the keys alone."""
    keys = list(tensors)
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    diffusers = tuple(f"{c}." for c in DIFFUSERS_COMPONENTS)
    if any(k.startswith(diffusers) and ".lora_A." in k for k in keys):
        return "diffusers"
    return "unknown"


def describe_family(tensors: dict, family=None) -> str | None:
    """Spot LoRAs made for another architecture than `family` (default: an SD1/SD2 base), to say so instead of
    failing obscurely. Returns what the file is for, or None when it fits."""
    keys = list(tensors)
    if any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.")) for k in keys):
        return "a transformer-based model (Flux/SD3)"
    found = family_of_lora(keys)
    base = family or FAMILIES["sd1"]
    if found is None or found.lora_compatible_with(base):
        return None
    return found.lora_label


# --- what can be wrong with a file on its own ----------------------------------------------------------------------
def _finite(t: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(t.float()).all())
    except (RuntimeError, TypeError):  # a dtype torch cannot compute with: reported as such elsewhere
        return True


def lora_file_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Problems of a LoRA in kohya/LyCORIS naming (a diffusers file converted first), before any base model is
    involved: numbers that are not finite, tensors that are not floating point, ranks and shapes that do not make a
    LoRA, an alpha that is not one number. [] when it is well formed."""
    problems: list[str] = []
    nonfloat = [k for k, v in tensors.items() if not v.is_floating_point()]
    if nonfloat:
        problems.append(f"{len(nonfloat)} tensor(s) are not floating point (e.g. {nonfloat[0]} is {tensors[nonfloat[0]].dtype}); "
                        "LoRA weights are float16/bfloat16/float32")
    nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not _finite(v)]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or infinite values (e.g. {nonfinite[0]}): the weights are broken "
                        "(the training diverged, or the file was damaged)")
    shape_problems = []
    for prefix, parts in sorted(lycoris.group_modules(tensors).items()):
        alpha = lycoris.alpha_problem(parts)
        if alpha:
            shape_problems.append(f"{prefix}: {alpha}")
        if "unknown" in parts:
            continue  # not a LoRA key: the key check names it (unmapped)
        if lycoris.algo_of(parts) in ("loha", "lokr"):
            continue  # their shapes only make sense against the module's weight: the key check judges them
        pair = lycoris.pair_problem(parts)
        if pair:
            shape_problems.append(f"{prefix}: {pair}")
    problems += shape_problems[:_SHOW]
    if len(shape_problems) > _SHOW:
        problems.append(f"... and {len(shape_problems) - _SHOW} more modules with bad shapes")
    return problems


def refuse_broken(tensors: dict[str, torch.Tensor], path, error=ValueError) -> None:
    """Raise `error` with one sentence naming the file when it has any of the problems above."""
    problems = lora_file_problems(tensors)
    if problems:
        more = f" (and {len(problems) - 2} more problems)" if len(problems) > 2 else ""
        raise error(f"'{shown(path)}' is not a usable LoRA: {'; '.join(problems[:2])}{more}. Run python -m sdlora verify on it, "
                    "or use another file.")


# --- a file against a base model ---------------------------------------------------------------------------------
def module_index(family, components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya prefix -> (component name, module path) for every Linear/Conv2d of the base model's components
    (unet, text_encoder[, text_encoder_2]), named by the family's rule."""
    from ..adapters.inject import base_modules

    index = {}
    for component, root in components.items():
        if root is None:
            continue
        config = root.config if component == "unet" else None
        # base_modules sees through LoRA wrappers, so a model that already carries LoRAs indexes the same.
        for name, module in base_modules(root):
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or (component != "unet" and not isinstance(module, nn.Linear)):
                continue
            try:
                prefix = family.kohya_prefix(component, name, config)
            except KohyaNameError:
                continue
            if prefix is not None:
                index[prefix] = (component, name)
    return index


def base_layer(components: dict[str, nn.Module], target: tuple[str, str]) -> nn.Module:
    """The plain Linear/Conv2d at `target` (component, module path), under any adapter wrapping it."""
    component, path = target
    module = components[component].get_submodule(path)
    return getattr(module, "base_layer", module)


@dataclass
class KeyMatch:
    """How a file's modules map onto a base model; check_keys fills it (or a VerifyReport, which has the same fields)."""

    modules: int = 0
    mapped: int = 0
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_keys(tensors: dict, family, components: dict[str, nn.Module], report: KeyMatch) -> dict[str, dict]:
    """Map each kohya/LyCORIS module onto the base model's components; {prefix: parts with "target"}. Fills `report`'s
    modules, mapped, unmapped and problems."""
    index = module_index(family, components)
    groups = lycoris.group_modules(tensors)
    report.modules = len(groups)
    mapped = {}
    for prefix, parts in sorted(groups.items()):
        target = index.get(prefix)
        if target is None or "unknown" in parts:
            report.unmapped.append(prefix)
            continue
        why = lycoris.shape_problem(parts, tuple(base_layer(components, target).weight.shape))
        if why:
            report.problems.append(f"{prefix}: {why}")
            continue
        mapped[prefix] = {"target": target, **parts}
    report.mapped = len(mapped)
    return mapped
