"""Use LoRA files: load one or several into a pipeline at chosen strengths, generate, strength grids."""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..adapters.layers import has_peft_adapters
from ..families import family_of_pipeline
from ..formats import lycoris
from ..formats.diffusers_lora import diffusers_to_kohya
from ..formats.lora_file import (
    KeyMatch,
    LoraLoadError,
    LoraMismatchError,
    base_layer,
    check_keys,
    describe_family,
    detect_format,
    not_a_file,
    read_lora,
    refuse_broken,
)
from .sampling import SamplePrompt, generate, label_image, make_grid


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]`; a trailing `:number` is the strength (paths may contain ':' elsewhere)."""
    m = re.fullmatch(r"(.+?):(-?\d+(?:\.\d*)?|-?\.\d+)", arg)
    if m and not Path(arg).exists():
        return Path(m.group(1)).expanduser(), float(m.group(2))
    return Path(arg).expanduser(), 1.0


def check_lora_fits(path: Path, pipe) -> dict[str, dict]:
    """Refuse a LoRA made for another architecture before diffusers half-loads it; returns its modules mapped onto the
    pipeline ({prefix: parts with "target"})."""
    tensors, metadata = read_lora(path)
    fmt = detect_format(tensors)
    family = family_of_pipeline(pipe)
    other = describe_family(tensors, family)
    if other:
        raise LoraMismatchError(f"'{path.name}' is a LoRA for {other}; this base model is {family.label}. Pick a LoRA "
                                "trained for this base model.")
    if fmt == "unknown":
        raise LoraMismatchError(f"'{path.name}' does not look like a LoRA (no lora_unet_/lora_te_ or unet./text_encoder. keys).")
    if fmt == "diffusers":
        tensors = diffusers_to_kohya(tensors, metadata, family, pipe.unet.config, source=path)
    refuse_broken(tensors, path, LoraLoadError)  # NaN weights, integer tensors, odd ranks or alpha shapes
    report = KeyMatch()
    components = {"unet": pipe.unet, **{n: getattr(pipe, n, None) for n in family.text_encoder_names}}
    mapped = check_keys(tensors, family, components, report)
    if report.unmapped or report.problems:
        detail = (report.problems + [f"no module for {k}" for k in report.unmapped])[:3]
        raise LoraMismatchError(f"'{path.name}' does not fit this base model ({report.mapped} of {report.modules} modules match; e.g. {'; '.join(detail)}). It was probably trained for another model.")
    return mapped


def adapter_name_for(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
    return f"l{index}_{stem}"


class FormulaLoras:
    """LoRA files diffusers cannot load (LoHa, LoKr, DoRA, Tucker cores) applied as ComfyUI and A1111 apply every file:
    each touched layer computes with W + Σ strength_i · ΔW_i (sdlora.formats.lycoris). The sum is added to the layer's
    output by a forward hook, never written into W: the base model is shared (merge, extract and verify read it while
    files are loaded), so its weights stay bit-exact."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.files: dict[str, dict[str, dict]] = {}      # adapter name -> {prefix: parts with "target"}
        self.strengths: dict[str, float] = {}
        self.layers: dict[tuple[str, str], torch.nn.Module] = {}
        self.deltas: dict[tuple[str, str], torch.Tensor] = {}   # target -> Σ strength · ΔW, in the weight's dtype
        self.hooks: dict[tuple[str, str], object] = {}

    def add(self, name: str, mapped: dict[str, dict]) -> None:
        self.files[name] = mapped
        self.strengths[name] = 1.0
        components = {c: getattr(self.pipe, c) for c in {p["target"][0] for p in mapped.values()}}
        for parts in mapped.values():
            self.layers.setdefault(parts["target"], base_layer(components, parts["target"]))
        self._apply()

    def set_strengths(self, strengths: dict[str, float]) -> None:
        self.strengths.update(strengths)
        self._apply()

    @torch.no_grad()
    def _apply(self) -> None:
        totals: dict[tuple[str, str], torch.Tensor] = {}
        for name, mapped in self.files.items():
            s = self.strengths[name]
            if s == 0:
                continue
            for parts in mapped.values():
                target = parts["target"]
                delta = s * lycoris.module_delta(parts, self.layers[target].weight)
                totals[target] = totals[target] + delta if target in totals else delta
        for target in [t for t in self.hooks if t not in totals]:  # strength 0 everywhere: the plain layer again
            self.hooks.pop(target).remove()
            self.deltas.pop(target, None)
        for target, total in totals.items():
            layer = self.layers[target]
            self.deltas[target] = total.to(layer.weight.dtype)
            if target not in self.hooks:
                self.hooks[target] = layer.register_forward_hook(partial(self._add_delta, target))

    def _add_delta(self, target, layer, args, output):
        delta = self.deltas[target]
        if delta.device != layer.weight.device or delta.dtype != layer.weight.dtype:  # the pipeline moved since
            delta = self.deltas[target] = delta.to(layer.weight)
        return output + delta_output(layer, args[0], delta)

    def restore(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.files.clear()
        self.strengths.clear()
        self.layers.clear()
        self.deltas.clear()
        self.hooks.clear()


def delta_output(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What weight change `delta` adds to the layer's output for input x: for a conv, the layer's own stride, padding,
    dilation and padding mode with ΔW for W and no bias."""
    if isinstance(layer, torch.nn.Conv2d):
        return layer._conv_forward(x, delta, None)
    return F.linear(x, delta)


@contextmanager
def formula_applied(components: dict, mapped: dict[str, dict], strength: float = 1.0):
    """Every module of `mapped` computes with W + strength·ΔW (the loaders' formula) inside the block. Forward hooks
    rebuild ΔW on each call in fp32 and keep nothing, so even a file that touches most of an SDXL costs one layer's ΔW
    at a time, and W is never written (the base may be shared)."""
    by_target: dict[tuple[str, str], list[dict]] = {}
    for parts in mapped.values():
        by_target.setdefault(parts["target"], []).append(parts)
    handles = []
    try:
        for target, modules in by_target.items():
            layer = base_layer(components, target)
            handles.append(layer.register_forward_hook(partial(_formula_hook, modules, strength)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _formula_hook(modules: list[dict], strength: float, layer, args, output):
    with torch.no_grad():
        delta = sum(lycoris.module_delta(parts, layer.weight) for parts in modules) * strength
        return output + delta_output(layer, args[0].to(delta.dtype), delta).to(output.dtype)


def formula_loras(pipe, create: bool = True) -> FormulaLoras | None:
    """The formula-applied files of the pipeline's UNet (kept on the UNet: pipelines built on the same base share it)."""
    current = getattr(pipe.unet, "_sdlora_formula_loras", None)
    if current is None and create:
        current = FormulaLoras(pipe)
        pipe.unet._sdlora_formula_loras = current
    return current


def _components(pipe) -> list:
    return [pipe.unet, *(getattr(pipe, n, None) for n in family_of_pipeline(pipe).text_encoder_names)]


def carries_peft_loras(pipe) -> bool:
    """Whether diffusers' loader has put LoRA adapters into any of the pipeline's components."""
    return any(has_peft_adapters(m) for m in _components(pipe))


@contextmanager
def loras_off(pipe):
    """The bare base model for the duration of the block, even when a shared pipeline carries LoRAs; they are on
    again, at their strengths, afterwards."""
    loaded = carries_peft_loras(pipe)
    formula = formula_loras(pipe, create=False)
    strengths = dict(formula.strengths) if formula is not None else {}
    if loaded:
        pipe.disable_lora()
    if strengths:
        formula.set_strengths({name: 0.0 for name in strengths})
    try:
        yield
    finally:
        if loaded:
            pipe.enable_lora()
        if strengths:
            formula.set_strengths(strengths)


def unload_loras(pipe) -> None:
    """Take every LoRA off a pipeline (diffusers adapters and formula-applied files), leaving the base weights exact."""
    formula = formula_loras(pipe, create=False)
    if formula is not None:
        formula.restore()
    if carries_peft_loras(pipe):
        pipe.unload_lora_weights()


def load_loras(pipe, loras: list[tuple[Path, float]]) -> list[str]:
    """Load LoRA files into the pipeline and set their strengths; returns adapter names. Plain LoRA/LoCon files go
    through diffusers' loader; LoHa, LoKr, DoRA and Tucker files through the loaders' formula (FormulaLoras)."""
    names = []
    for i, (path, _) in enumerate(loras):
        path = Path(path)
        if not path.is_file():
            raise LoraLoadError(not_a_file(path))
        mapped = check_lora_fits(path, pipe)
        name = adapter_name_for(i, path)
        if not lycoris.diffusers_reads_all(mapped):
            formula_loras(pipe).add(name, mapped)
            names.append(name)
            continue
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - whatever diffusers trips over in a file that passed our checks
            from ..errorlog import what_went_wrong
            from ..safetext import shown

            try:
                pipe.delete_adapters(name)  # no half-loaded adapter may stay behind in a shared pipeline
            except Exception:  # noqa: BLE001
                pass
            raise LoraLoadError(f"diffusers could not load '{shown(path)}' ({what_went_wrong(exc)}). Check it with "
                                "python -m sdlora verify.") from None
        names.append(name)
    if names:
        set_strengths(pipe, names, [float(s) for _, s in loras])
    return names


def set_strengths(pipe, names: list[str], strengths: list[float]) -> None:
    formula = formula_loras(pipe, create=False)
    patched = {n: float(s) for n, s in zip(names, strengths) if formula is not None and n in formula.files}
    if patched:
        formula.set_strengths(patched)
    rest = [(n, float(s)) for n, s in zip(names, strengths) if n not in patched]
    if rest:
        pipe.set_adapters([n for n, _ in rest], adapter_weights=[s for _, s in rest])


def strength_grid(pipe, names: list[str], prompts: list[SamplePrompt], strengths: list[float], *, default_size: int,
                  default_steps: int = 20, seed: int = 0, clip_skip: int = 1, family=None) -> Image.Image:
    """One row per prompt, one column per strength, same seed across a row. Strengths scale all loaded LoRAs together."""
    cells = []
    for p in prompts:
        for s in strengths:
            set_strengths(pipe, names, [s] * len(names))
            img = generate(pipe, p, default_size=default_size, default_steps=default_steps, default_seed=seed,
                           clip_skip=clip_skip, family=family)
            cells.append(label_image(img, f"strength {s:g}"))
    return make_grid(cells, columns=len(strengths))
