"""Use LoRA files: load one or several into a pipeline at chosen strengths, generate, strength grids."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..formats.export import read_lora
from ..families import FAMILIES, family_of_pipeline
from .sampling import SamplePrompt, generate, label_image, make_grid


class LoraLoadError(UserError, ValueError):
    pass


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]`; a trailing `:number` is the strength (paths may contain ':' elsewhere)."""
    m = re.fullmatch(r"(.+?):(-?\d+(?:\.\d*)?|-?\.\d+)", arg)
    if m and not Path(arg).exists():
        return Path(m.group(1)).expanduser(), float(m.group(2))
    return Path(arg).expanduser(), 1.0


def _adapter_configs(metadata: dict[str, str], source) -> dict[str, dict]:
    """The LoRA configs diffusers stores in the file ("unet.lora_alpha": 4, ...), grouped by component; a damaged one is
    refused with a sentence (diffusers would fail on it with a traceback, or load wrong ranks silently)."""
    from ..safetext import shown

    if "lora_adapter_metadata" not in metadata:
        return {}

    def bad(why: str) -> LoraLoadError:
        return LoraLoadError(f"'{shown(source)}' has damaged diffusers metadata: {why}. Re-export the LoRA "
                             "(python -m sdlora export FILE --format diffusers) or use the kohya file.")

    try:
        raw = json.loads(metadata["lora_adapter_metadata"])
    except (ValueError, RecursionError):
        raise bad("lora_adapter_metadata is not valid JSON") from None
    if not isinstance(raw, dict):
        raise bad("lora_adapter_metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in raw.items():
        prefix, _, field = str(key).partition(".")
        configs.setdefault(prefix, {})[field] = value
    for part, cfg in configs.items():
        for name in ("lora_alpha", "r"):
            v = cfg.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise bad(f"{part}.{name} is {v!r}, not a positive number")
        for name in ("alpha_pattern", "rank_pattern"):
            patterns = cfg.get(name)
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise bad(f"{part}.{name} is not a mapping")
            for pattern, v in patterns.items():
                try:
                    re.compile(pattern)
                except re.error:
                    raise bad(f"{part}.{name} has an invalid pattern {pattern!r}") from None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise bad(f"{part}.{name}[{pattern!r}] is {v!r}, not a positive number")
    return configs


def _configured(cfg: dict, field: str, pattern_field: str, path: str, default):
    value = cfg.get(field, default)
    for pattern, v in (cfg.get(pattern_field) or {}).items():
        if re.search(pattern, path):
            value = v
    return value


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family=None,
                       unet_config=None, *, source="LoRA file") -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format file in kohya terms (used by verify), named by the family's rule; alpha comes from the
    stored LoRA config. Damaged metadata raises LoraLoadError naming `source`."""
    from ..safetext import shown

    family = family or FAMILIES["sd1"]
    configs = _adapter_configs(metadata, source)
    out = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m or m.group(1) not in ("unet", *family.text_encoder_names):
            out[key] = value
            continue
        part, path, ab = m.groups()
        try:
            prefix = family.kohya_prefix(part, path, unet_config)
        except ValueError:
            prefix = None
        if prefix is None:
            out[key] = value
            continue
        out[f"{prefix}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = value
        if ab == "A" and value.dim() >= 1:  # a malformed A (0-d) is named by the shape checks later
            cfg = configs.get(part, {})
            # Only the plain case is judged here (per-module patterns are PEFT's to match); diffusers builds the layers
            # from this number, so a wrong one would fail inside its loader.
            rank = None if cfg.get("rank_pattern") else cfg.get("r")
            if rank is not None and int(rank) != value.shape[0]:
                raise LoraLoadError(f"'{shown(source)}' has damaged diffusers metadata: it says rank {rank} for {part}.{path}, "
                                    f"but the weights have rank {value.shape[0]}. Re-export the LoRA or use the kohya file.")
            alpha = _configured(cfg, "lora_alpha", "alpha_pattern", path, value.shape[0])
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


def check_lora_fits(path: Path, pipe) -> dict[str, dict]:
    """Refuse a LoRA made for another architecture before diffusers half-loads it; returns its modules mapped onto the
    pipeline ({prefix: parts with "target"})."""
    from ..tools.verify import (
        LoraMismatchError,
        VerifyReport,
        check_keys,
        describe_family,
        detect_format,
    )

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
    from ..formats.lora_check import refuse_broken

    refuse_broken(tensors, path, LoraLoadError)  # NaN weights, integer tensors, odd ranks or alpha shapes
    report = VerifyReport(path=str(path))
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
    """LoRA files diffusers cannot load (LoHa, LoKr, DoRA, Tucker cores) applied the way ComfyUI and A1111 apply every
    file: the weights become W + Σ strength_i · ΔW_i (sdlora.formats.lycoris). The original weights of the touched
    modules are kept and put back exactly by `restore`."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.files: dict[str, dict[str, dict]] = {}      # adapter name -> {prefix: parts with "target"}
        self.strengths: dict[str, float] = {}
        self.originals: dict[tuple[str, str], torch.Tensor] = {}

    def _weight(self, target) -> torch.Tensor:
        component, path = target
        module = getattr(self.pipe, component).get_submodule(path)
        return getattr(module, "base_layer", module).weight

    def add(self, name: str, mapped: dict[str, dict]) -> None:
        self.files[name] = mapped
        self.strengths[name] = 1.0
        for parts in mapped.values():
            if parts["target"] not in self.originals:
                self.originals[parts["target"]] = self._weight(parts["target"]).detach().clone()

    @torch.no_grad()
    def set_strengths(self, strengths: dict[str, float]) -> None:
        from ..formats.lycoris import module_delta

        self.strengths.update(strengths)
        for target, original in self.originals.items():
            self._weight(target).copy_(original)
        for name, mapped in self.files.items():
            s = self.strengths[name]
            if s == 0:
                continue
            for parts in mapped.values():
                weight = self._weight(parts["target"])
                weight += (s * module_delta(parts, self.originals[parts["target"]])).to(weight.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        for target, original in self.originals.items():
            self._weight(target).copy_(original)
        self.files.clear()
        self.strengths.clear()
        self.originals.clear()


def formula_loras(pipe, create: bool = True) -> FormulaLoras | None:
    """The formula-applied files of the pipeline's UNet (kept on the UNet: pipelines built on the same base share it)."""
    current = getattr(pipe.unet, "_sdlora_formula_loras", None)
    if current is None and create:
        current = FormulaLoras(pipe)
        pipe.unet._sdlora_formula_loras = current
    return current


def unload_loras(pipe) -> None:
    """Take every LoRA off a pipeline (diffusers adapters and formula-applied files), leaving the base weights exact."""
    formula = formula_loras(pipe, create=False)
    if formula is not None:
        formula.restore()
    family = family_of_pipeline(pipe)
    components = [pipe.unet, *(getattr(pipe, n, None) for n in family.text_encoder_names)]
    if any(getattr(m, "peft_config", None) for m in components if m is not None):
        pipe.unload_lora_weights()


def load_loras(pipe, loras: list[tuple[Path, float]]) -> list[str]:
    """Load LoRA files into the pipeline and set their strengths; returns adapter names. Plain LoRA/LoCon files go
    through diffusers' loader; LoHa, LoKr, DoRA and Tucker files through the loaders' formula (FormulaLoras)."""
    names = []
    for i, (path, _) in enumerate(loras):
        path = Path(path)
        if not path.is_file():
            from ..formats.lora_check import not_a_file

            raise LoraLoadError(not_a_file(path))
        mapped = check_lora_fits(path, pipe)
        name = adapter_name_for(i, path)
        from ..formats.lycoris import diffusers_reads

        if not all(diffusers_reads(p) for p in mapped.values()):
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
                  default_steps: int = 20, seed: int = 0) -> Image.Image:
    """One row per prompt, one column per strength, same seed across a row. Strengths scale all loaded LoRAs together."""
    cells = []
    for p in prompts:
        for s in strengths:
            set_strengths(pipe, names, [s] * len(names))
            img = generate(pipe, p, default_size=default_size, default_steps=default_steps, default_seed=seed)
            cells.append(label_image(img, f"strength {s:g}"))
    return make_grid(cells, columns=len(strengths))
