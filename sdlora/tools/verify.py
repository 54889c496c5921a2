"""Check an exported LoRA against a base model: every key maps to a module, and diffusers' loader
computes exactly W + (alpha/r)·up·down."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..families import SampleGeometry
from ..formats import lycoris
from ..formats.diffusers_lora import diffusers_to_kohya
from ..formats.lora_file import (
    LoraLoadError,
    base_layer,
    check_keys,
    describe_family,
    detect_format,
    lora_file_problems,
    read_lora,
)
from ..errors import UserError
from ..inference.loras import carries_peft_loras, formula_applied, loras_off

# Beyond the file's own tensors: the probe's activations (one 16x16 latent through the UNet) and the libraries' bookkeeping.
_VERIFY_MARGIN = 512 * 2**20


class VerifyMemoryError(UserError, MemoryError):
    """Not enough free memory to verify; the message says how much is needed and what to do."""


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
    text_encoder_effect: float | None = None
    algorithms: str = ""
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return not self.unmapped and not self.problems and self.mapped > 0

    def summary(self) -> str:
        held = f", {self.algorithms}" if self.algorithms else ""
        lines = [f"LoRA file: {self.path} ({self.format} format{held})",
                 f"modules: {self.modules}, mapped onto the base model: {self.mapped}, unmapped: {len(self.unmapped)}"]
        lines += [f"  unmapped: {k}" for k in self.unmapped[:20]]
        if len(self.unmapped) > 20:
            lines.append(f"  ... and {len(self.unmapped) - 20} more")
        if self.unet_max_diff is not None:
            lines.append(f"UNet: diffusers loader vs W+(alpha/r)·up·down: max abs diff {self.unet_max_diff:.3g} (tolerance {self.tolerance:g}); LoRA changes the output by {self.lora_effect:.3g}")
        elif self.lora_effect is not None:
            lines.append("diffusers has no loader for these adapter types; applied with ComfyUI's and A1111's formula, "
                         f"the LoRA changes the UNet output by {self.lora_effect:.3g}"
                         + (f" and the text encoders' by {self.text_encoder_effect:.3g}" if self.text_encoder_effect else ""))
        if self.text_encoder_max_diff is not None:
            lines.append(f"text encoder: max abs diff {self.text_encoder_max_diff:.3g}")
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = self.__dict__.copy()
        d["ok"] = self.ok
        return d


@torch.no_grad()
def apply_kohya_by_hand(components: dict[str, nn.Module], mapped: dict[str, dict], strength: float = 1.0) -> None:
    """W += strength · ΔW with ΔW as ComfyUI/A1111 compute it (sdlora.formats.lycoris), directly on the weights: the
    reference for the check."""
    for parts in mapped.values():
        weight = base_layer(components, parts["target"]).weight
        weight.copy_(lycoris.merged_weight(parts, weight, strength))


def _probe_inputs(base, seed: int = 0):
    """Latents, a timestep, token ids for each encoder and the size conditioning: the same probe for every family."""
    gen = torch.Generator().manual_seed(seed)
    unet = base.unet
    size = min(int(unet.config.sample_size), 16)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([500])
    ids = base.family.tokenize(base.tokenizers, ["a photo of sks, detailed"])
    pixels = (size * 8, size * 8)
    geometry = SampleGeometry(pixels, (0, 0), pixels)
    return latents, t, ids, geometry


def _forward(family, unet, encoders, ids, latents, t, geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text hidden states) of one probe through the family's own encode and UNet call."""
    with torch.no_grad():
        text = family.encode_tokens(encoders, ids)
        cond = family.conditioning(text, [geometry])
        return family.unet_forward(unet, latents, t, cond), text.hidden


def _enable_only(pipe, components, name: str) -> None:
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[1.0])


def _verify_by_formula(report: VerifyReport, base, components, mapped) -> VerifyReport:
    """LoHa, LoKr, DoRA and Tucker files: diffusers has no loader for them, so the check is that the loaders' formula
    applies to every module and gives a finite, non-zero change."""
    family = base.family
    latents, t, ids, geometry = _probe_inputs(base)
    encoders = [components[n] for n in family.text_encoder_names]
    pipe = base.make_pipeline()
    with loras_off(pipe):
        base_out, base_hidden = _forward(family, base.unet, encoders, ids, latents, t, geometry)
        with formula_applied(components, mapped):
            ref_out, ref_hidden = _forward(family, base.unet, encoders, ids, latents, t, geometry)
    if not (torch.isfinite(ref_out).all() and torch.isfinite(ref_hidden).all()):
        report.problems.append("applied with the loaders' formula, the LoRA makes the model's output NaN or infinite")
    report.lora_effect = float((ref_out - base_out).abs().max())
    report.text_encoder_effect = float((ref_hidden - base_hidden).abs().max())
    return report


def verify_memory_needed(tensors: dict[str, torch.Tensor], components: dict[str, nn.Module],
                         mapped: dict[str, dict]) -> int:
    """Bytes verify needs on top of the loaded base: the file's tensors in fp32 three times (as read, diffusers'
    converted copy, the adapters it injects) and the largest adapted layer's ΔW four times (ΔW, the DoRA rescaled
    weight, the product and its output)."""
    lora = sum(t.numel() for t in tensors.values()) * 4 * 3
    largest = max((base_layer(components, p["target"]).weight.numel() for p in mapped.values()), default=0) * 4 * 4
    return lora + largest + _VERIFY_MARGIN


def check_verify_fits(path, tensors, components, mapped, device: torch.device) -> None:
    from ..training.memory import available_memory

    need = verify_memory_needed(tensors, components, mapped)
    free = available_memory(device)
    if free is not None and need > free:
        raise VerifyMemoryError(
            f"Verifying '{Path(path).name}' needs about {need / 2**30:.1f} GiB of free memory beside the loaded base model; "
            f"this machine has {free / 2**30:.1f} GiB free. The file itself is fine to use; close other programs or "
            f"models (or use a machine with more memory) and run python -m sdlora verify on it again.")


def verify_lora(path: str | Path, base, *, numeric: bool = True, tolerance: float = 1e-4) -> VerifyReport:
    """`base` is a loaded BaseModel (from sdlora.models). The base's weights are the same afterwards (the check runs
    on its own modules and restores them; LoRAs a shared pipeline carries are switched off, then on again)."""
    tensors, metadata = read_lora(Path(path))
    report = VerifyReport(path=str(path), format=detect_format(tensors), tolerance=tolerance)
    if report.format == "diffusers":
        try:
            tensors = diffusers_to_kohya(tensors, metadata, base.family, base.unet.config, source=path)
        except LoraLoadError as exc:  # damaged metadata: a finding, not a crash
            report.problems.append(str(exc))
            return report
    elif report.format != "kohya":
        fam = describe_family(tensors)
        report.problems.append(f"not a recognised LoRA layout{f' (looks like {fam})' if fam else ''}")
        return report
    fam = describe_family(tensors, base.family)
    if fam:
        report.problems.append(f"this LoRA is for {fam}, not for this {base.family.label} base model")
    report.problems += lora_file_problems(tensors)  # NaN/inf weights, non-float tensors, odd ranks and alpha shapes
    if report.problems:
        return report  # the key and numeric checks below assume well-formed tensors
    components = base.components()
    mapped = check_keys(tensors, base.family, components, report)
    if not numeric or not mapped or report.problems or report.unmapped:
        return report

    check_verify_fits(path, tensors, components, mapped, next(base.unet.parameters()).device)
    report.algorithms = lycoris.describe_algos(mapped)
    if not lycoris.diffusers_reads_all(mapped):
        return _verify_by_formula(report, base, components, mapped)

    # Everything runs on the base's own modules and nothing is copied (an SDXL UNet is 10 GB in fp32): the reference
    # adds each layer's ΔW to its output as it runs, and diffusers' adapter is deleted afterwards.
    family = base.family
    latents, t, ids, geometry = _probe_inputs(base)
    encoders = [components[n] for n in family.text_encoder_names]
    pipe = base.make_pipeline()
    with loras_off(pipe):  # the UI's Try may have LoRAs loaded into this shared base
        base_out, _ = _forward(family, base.unet, encoders, ids, latents, t, geometry)
        with formula_applied(components, mapped):
            ref_out, ref_hidden = _forward(family, base.unet, encoders, ids, latents, t, geometry)
            with torch.no_grad():
                ref_cond = family.conditioning(family.encode_tokens(encoders, ids), [geometry])
    name = "sdlora_verify"
    active = pipe.get_active_adapters() if carries_peft_loras(pipe) else []
    with warnings.catch_warnings():  # peft warns when a model that already carries adapters gets another one
        warnings.simplefilter("ignore", UserWarning)
        pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        _enable_only(pipe, components, name)
        _, hidden = _forward(family, pipe.unet, encoders, ids, latents, t, geometry)
        # The UNet is compared on the reference conditioning, so a text-encoder difference cannot hide in it.
        with torch.no_grad():
            out = family.unet_forward(pipe.unet, latents, t, ref_cond)
    finally:
        with warnings.catch_warnings():  # peft notes that the deleted adapter was active: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            pipe.delete_adapters(name)
        if active:  # the shared pipeline's own LoRAs are active again, as before
            pipe.set_adapters(active)
    report.unet_max_diff = float((out - ref_out).abs().max())
    report.text_encoder_max_diff = float((hidden - ref_hidden).abs().max())
    report.lora_effect = float((ref_out - base_out).abs().max())
    if report.unet_max_diff > tolerance:
        report.problems.append(f"UNet output through diffusers differs from the hand-applied LoRA by {report.unet_max_diff:.3g}")
    if report.text_encoder_max_diff > tolerance:
        report.problems.append(f"text-encoder output through diffusers differs from the hand-applied LoRA by {report.text_encoder_max_diff:.3g}")
    return report
