"""Use LoRA files: load one or several into a pipeline at chosen strengths, generate, strength grids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image

from .export import read_lora
from .families import FAMILIES, family_of_pipeline
from .sampling import SamplePrompt, generate, label_image, make_grid


class LoraLoadError(ValueError):
    pass


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]`; a trailing `:number` is the strength (paths may contain ':' elsewhere)."""
    m = re.fullmatch(r"(.+?):(-?\d+(?:\.\d*)?|-?\.\d+)", arg)
    if m and not Path(arg).exists():
        return Path(m.group(1)).expanduser(), float(m.group(2))
    return Path(arg).expanduser(), 1.0


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family=None,
                       unet_config=None) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format file in kohya terms (used by verify), named by the family's rule; alpha comes from the
    stored LoRA config."""
    family = family or FAMILIES["sd1"]
    configs = {}
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        for key, value in raw.items():
            prefix, _, field = key.partition(".")
            configs.setdefault(prefix, {})[field] = value
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
        if ab == "A":
            cfg = configs.get(part, {})
            alpha = cfg.get("lora_alpha", value.shape[0])
            for pattern, a in (cfg.get("alpha_pattern") or {}).items():
                if re.search(pattern, path):
                    alpha = a
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


def check_lora_fits(path: Path, pipe) -> None:
    """Refuse a LoRA made for another architecture before diffusers half-loads it."""
    from .verify import LoraMismatchError, VerifyReport, check_keys, describe_family, detect_format

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
        tensors = diffusers_to_kohya(tensors, metadata, family, pipe.unet.config)
    report = VerifyReport(path=str(path))
    components = {"unet": pipe.unet, **{n: getattr(pipe, n, None) for n in family.text_encoder_names}}
    check_keys(tensors, family, components, report)
    if report.unmapped or report.problems:
        detail = (report.problems + [f"no module for {k}" for k in report.unmapped])[:3]
        raise LoraMismatchError(f"'{path.name}' does not fit this base model ({report.mapped} of {report.modules} modules match; e.g. {'; '.join(detail)}). It was probably trained for another model.")


def adapter_name_for(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
    return f"l{index}_{stem}"


def load_loras(pipe, loras: list[tuple[Path, float]]) -> list[str]:
    """Load LoRA files into the pipeline and set their strengths; returns adapter names."""
    names = []
    for i, (path, _) in enumerate(loras):
        path = Path(path)
        if not path.is_file():
            raise LoraLoadError(f"LoRA file '{path}' not found.")
        check_lora_fits(path, pipe)
        name = adapter_name_for(i, path)
        pipe.load_lora_weights(str(path), adapter_name=name)
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])
    return names


def set_strengths(pipe, names: list[str], strengths: list[float]) -> None:
    pipe.set_adapters(names, adapter_weights=[float(s) for s in strengths])


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
