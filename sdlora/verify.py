"""Check an exported LoRA against a base model: every key maps to a module, and diffusers' loader
computes exactly W + (alpha/r)·up·down."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .export import read_lora, text_encoder_kohya_prefix, unet_kohya_prefix

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoraMismatchError(ValueError):
    pass


@dataclass
class VerifyReport:
    path: str
    format: str = "kohya"
    modules: int = 0
    mapped: int = 0
    unmapped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unet_max_diff: float | None = None
    text_encoder_max_diff: float | None = None
    lora_effect: float | None = None
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return not self.unmapped and not self.problems and self.mapped > 0

    def summary(self) -> str:
        lines = [f"LoRA file: {self.path} ({self.format} format)",
                 f"modules: {self.modules}, mapped onto the base model: {self.mapped}, unmapped: {len(self.unmapped)}"]
        lines += [f"  unmapped: {k}" for k in self.unmapped[:20]]
        if len(self.unmapped) > 20:
            lines.append(f"  ... and {len(self.unmapped) - 20} more")
        if self.unet_max_diff is not None:
            lines.append(f"UNet: diffusers loader vs W+(alpha/r)·up·down: max abs diff {self.unet_max_diff:.3g} (tolerance {self.tolerance:g}); LoRA changes the output by {self.lora_effect:.3g}")
        if self.text_encoder_max_diff is not None:
            lines.append(f"text encoder: max abs diff {self.text_encoder_max_diff:.3g}")
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["ok"] = self.ok
        return d


def module_index(unet: nn.Module, text_encoder: nn.Module | None) -> dict[str, tuple[str, str]]:
    """kohya prefix -> ("unet"|"text_encoder", module path) for every Linear/Conv2d of the base model."""
    from .lora import base_modules

    index = {}
    # _base_modules sees through LoRA wrappers, so a model that already carries LoRAs indexes the same.
    for name, module in base_modules(unet):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            index[unet_kohya_prefix(name)] = ("unet", name)
    if text_encoder is not None:
        for name, module in base_modules(text_encoder):
            if isinstance(module, nn.Linear):
                try:
                    index[text_encoder_kohya_prefix(name)] = ("text_encoder", name)
                except Exception:
                    continue
    return index


def group_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix in _SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[suffix.strip(".").split(".")[0]] = value
                break
        else:
            groups.setdefault(key, {})["unknown"] = value
    return groups


def detect_format(tensors: dict) -> str:
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.")) and ".lora_A." in k for k in keys):
        return "diffusers"
    return "unknown"


def describe_family(tensors: dict) -> str | None:
    """Spot LoRAs made for another architecture, to say so instead of failing obscurely."""
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_")) or k.startswith("text_encoder_2.") for k in keys):
        return "SDXL"
    if any("input_blocks_" in k or "output_blocks_" in k for k in keys):
        return "SDXL (or an LDM-named LoRA)"
    if any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.")) for k in keys):
        return "a transformer-based model (Flux/SD3)"
    return None


def check_keys(tensors: dict, unet: nn.Module, text_encoder: nn.Module | None, report: VerifyReport) -> dict[str, dict]:
    """Map each kohya module onto the base model; fill report.mapped/unmapped/problems."""
    index = module_index(unet, text_encoder)
    groups = group_kohya(tensors)
    report.modules = len(groups)
    mapped = {}
    for prefix, parts in sorted(groups.items()):
        target = index.get(prefix)
        if target is None or "unknown" in parts:
            report.unmapped.append(prefix)
            continue
        if "lora_down" not in parts or "lora_up" not in parts:
            report.problems.append(f"{prefix}: needs both lora_down and lora_up")
            continue
        root = unet if target[0] == "unet" else text_encoder
        module = root.get_submodule(target[1])
        module = getattr(module, "base_layer", module)
        down, up = parts["lora_down"], parts["lora_up"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            report.problems.append(f"{prefix}: lora_up {tuple(up.shape)} does not match rank {rank} of lora_down {tuple(down.shape)}")
            continue
        w = module.weight
        if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0]:
            report.problems.append(f"{prefix}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the module weight {tuple(w.shape)}")
            continue
        mapped[prefix] = {"target": target, **parts}
    report.mapped = len(mapped)
    return mapped


@torch.no_grad()
def apply_kohya_by_hand(unet: nn.Module, text_encoder: nn.Module | None, mapped: dict[str, dict], strength: float = 1.0) -> None:
    """W += strength · (alpha/r) · up @ down, done directly on the weights (the reference for the check)."""
    for prefix, parts in mapped.items():
        kind, path = parts["target"]
        root = unet if kind == "unet" else text_encoder
        module = root.get_submodule(path)
        module = getattr(module, "base_layer", module)
        down = parts["lora_down"].float()
        up = parts["lora_up"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        scale = strength * alpha / rank
        if down.dim() == 4:
            # up is out×r×1×1; down is r×in×k×k: the product is a conv kernel out×in×k×k
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            delta = up @ down
        module.weight += (scale * delta).to(module.weight.dtype).reshape(module.weight.shape)


def _probe_inputs(unet, text_encoder, tokenizer, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = int(unet.config.sample_size)
    size = min(size, 16)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([500])
    ids = tokenizer(["a photo of sks, detailed"], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return latents, t, ids


def verify_lora(path: str | Path, base, *, numeric: bool = True, tolerance: float = 1e-4) -> VerifyReport:
    """`base` is a loaded BaseModel (from sdlora.models). The base's modules are not modified."""
    tensors, metadata = read_lora(Path(path))
    report = VerifyReport(path=str(path), format=detect_format(tensors), tolerance=tolerance)
    if report.format == "diffusers":
        from .inference import diffusers_to_kohya

        tensors = diffusers_to_kohya(tensors, metadata)
    elif report.format != "kohya":
        fam = describe_family(tensors)
        report.problems.append(f"not a recognised LoRA layout{f' (looks like {fam})' if fam else ''}")
        return report
    fam = describe_family(tensors)
    if fam:
        report.problems.append(f"this LoRA is for {fam}, not for this {base.family.upper()} base model")
    mapped = check_keys(tensors, base.unet, base.text_encoder, report)
    if not numeric or not mapped or report.problems or report.unmapped:
        return report

    from .inference import load_loras

    latents, t, ids = _probe_inputs(base.unet, base.text_encoder, base.tokenizer)
    # Reference: hand-applied math on copies of the base.
    from .lora import strip_lora

    def clean(module):
        # The base may be shared with a pipeline that has LoRAs loaded: compare against the bare weights.
        return strip_lora(copy.deepcopy(module)).float()

    ref_unet, ref_te = clean(base.unet), clean(base.text_encoder)
    with torch.no_grad():
        base_hidden = ref_te(ids)[0]
        base_out = ref_unet(latents, t, base_hidden).sample
    apply_kohya_by_hand(ref_unet, ref_te, mapped)
    with torch.no_grad():
        ref_hidden = ref_te(ids)[0]
        ref_out = ref_unet(latents, t, ref_hidden).sample
    # diffusers' own loader on another copy.
    pipe = base.make_pipeline(unet=clean(base.unet), text_encoder=clean(base.text_encoder))
    load_loras(pipe, [(Path(path), 1.0)])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        out = pipe.unet(latents, t, ref_hidden).sample
    report.unet_max_diff = float((out - ref_out).abs().max())
    report.text_encoder_max_diff = float((hidden - ref_hidden).abs().max())
    report.lora_effect = float((ref_out - base_out).abs().max())
    if report.unet_max_diff > tolerance:
        report.problems.append(f"UNet output through diffusers differs from the hand-applied LoRA by {report.unet_max_diff:.3g}")
    if report.text_encoder_max_diff > tolerance:
        report.problems.append(f"text-encoder output through diffusers differs from the hand-applied LoRA by {report.text_encoder_max_diff:.3g}")
    return report
