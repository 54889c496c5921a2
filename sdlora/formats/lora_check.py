"""What can be wrong with a LoRA file on its own, before any base model is involved: numbers that are not finite, tensors
that are not floating point, ranks and shapes that do not make a LoRA, an alpha that is not one number.

verify reports these as problems; generate, Try and export refuse such a file with a sentence naming it.
"""

from __future__ import annotations

import torch

from ..safetext import shown

_SHOW = 8


def _finite(t: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(t.float()).all())
    except (RuntimeError, TypeError):  # a dtype torch cannot compute with: reported as such elsewhere
        return True


def lora_file_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Problems of a LoRA in kohya/LyCORIS naming (a diffusers file converted first); [] when it is well formed."""
    from .lycoris import algo_of
    from ..tools.verify import group_kohya

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
    for prefix, parts in sorted(group_kohya(tensors).items()):
        down, up, alpha = parts.get("lora_down"), parts.get("lora_up"), parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            shape_problems.append(f"{prefix}: alpha has shape {tuple(alpha.shape)}; it must be a single number")
        if "unknown" in parts:
            continue  # not a LoRA key: the key check names it (unmapped)
        if algo_of(parts) in ("loha", "lokr"):
            continue  # their shapes only make sense against the module's weight: verify's key check judges them
        if down is None or up is None:
            shape_problems.append(f"{prefix}: needs both lora_down and lora_up")
            continue
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            shape_problems.append(f"{prefix}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not a linear (2-d) or "
                                  "conv (4-d) LoRA pair")
        elif down.shape[0] == 0 or down.numel() == 0 or up.numel() == 0:
            shape_problems.append(f"{prefix}: rank 0 (empty lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)})")
        elif up.shape[1] != down.shape[0]:
            shape_problems.append(f"{prefix}: lora_up {tuple(up.shape)} does not match rank {down.shape[0]} of lora_down {tuple(down.shape)}")
        elif down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            shape_problems.append(f"{prefix}: a conv lora_up must be out x rank x 1 x 1, not {tuple(up.shape)}")
    problems += shape_problems[:_SHOW]
    if len(shape_problems) > _SHOW:
        problems.append(f"... and {len(shape_problems) - _SHOW} more modules with bad shapes")
    return problems


def not_a_file(path) -> str:
    """Why `path` (which is not a regular file) cannot be a LoRA file, as a sentence."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        return f"'{shown(path)}' is a folder, not a LoRA file. Give the .safetensors file inside it."
    if path.exists():
        return f"'{shown(path)}' is not a regular file (a device, pipe or socket). Give a .safetensors LoRA file."
    return f"LoRA file '{shown(path)}' not found."


def refuse_broken(tensors: dict[str, torch.Tensor], path, error=ValueError) -> None:
    """Raise `error` with one sentence naming the file when it has any of the problems above."""
    problems = lora_file_problems(tensors)
    if problems:
        more = f" (and {len(problems) - 2} more problems)" if len(problems) > 2 else ""
        raise error(f"'{shown(path)}' is not a usable LoRA: {'; '.join(problems[:2])}{more}. Run python -m sdlora verify on it, "
                    "or use another file.")
