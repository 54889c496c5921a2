"""merge: bake LoRAs (any type sdlora.formats.lycoris reads, DoRA included) at given strengths into a base model and
write one single-file checkpoint in the original layout, which AUTOMATIC1111/Forge/ComfyUI load as a checkpoint and
sdlora loads back as a base model. Each LoRA applies to the weights as the loaders apply it: W + s·(W' − W), in the
order given."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import common
from .common import Progress, ToolError, ToolResult, no_progress


def merge_loras(base, loras: list[tuple[str | Path, float]], out, *, precision: str = "fp16",
                progress: Progress = no_progress) -> ToolResult:
    """Write base + Σ strength·LoRA as OUT (.safetensors). base: a model spec or a loaded BaseModel (left unchanged:
    the merged weights are new tensors). precision: of every weight in the file (the VAE included)."""
    from ..formats.ldm_checkpoint import layout_to_ldm, plain_state
    from ..formats.lora_file import describe_family, module_index
    from ..formats.lycoris import merged_weight

    common.check_precision(precision)
    if not loras:
        raise ToolError("Merge needs at least one LoRA file (FILE:STRENGTH).")
    base_name = str(base) if isinstance(base, (str, Path)) else getattr(base, "source", "base model")
    out = common.check_output(out, [base] if isinstance(base, (str, Path)) else [])
    files = [common.read_lora_file(p) for p, _ in loras]
    strengths = [float(s) for _, s in loras]
    if isinstance(base, (str, Path)):
        from ..models import load_base_model

        base = load_base_model(str(base))
    family = base.family
    components = base.components()
    index = module_index(family, components)
    shapes = common.base_shapes(base)
    for f in files:
        other = describe_family(f.tensors, family)
        if other:
            raise ToolError(f"LoRA {common._q(f.path)} is for {other}, but the base model '{base_name}' is {family.label}.")
        missing = [p for p in f.modules if p not in index]
        if missing:
            raise ToolError(f"LoRA {common._q(f.path)} adapts {len(missing)} module(s) the base model '{base_name}' does "
                            f"not have (e.g. {missing[0]}): it was made for another model.")
        for prefix, parts in f.modules.items():
            problem = common.lycoris.shape_problem(parts, shapes[prefix])
            if problem:
                raise ToolError(f"LoRA {common._q(f.path)} does not fit the base model '{base_name}' at {prefix}: {problem}.")
    states = {name: plain_state(module) for name, module in components.items()}
    merged: dict[tuple[str, str], torch.Tensor] = {}  # (component, weight key) -> new fp32 weight
    work = [(f, s, prefix, parts) for f, s in zip(files, strengths) for prefix, parts in sorted(f.modules.items())]
    with torch.no_grad():
        for i, (f, s, prefix, parts) in enumerate(work):
            progress(i, len(work), prefix)
            component, path = index[prefix]
            key = (component, f"{path}.weight")
            w = merged.get(key)
            if w is None:
                w = states[component][key[1]].float()
            merged[key] = merged_weight(parts, w, s)
    progress(len(work), len(work), "writing")
    dtype = common.PRECISIONS[precision]
    for (component, key), value in merged.items():
        states[component][key] = value
    states["vae"] = base.vae.state_dict()
    cast = {name: {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()} for name, sd in states.items()}
    tensors = layout_to_ldm(base, family.single_file_layout, states=cast)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    pred = getattr(base, "prediction_type", "epsilon")
    records = [common.input_record(f.path, {"strength": s}) for f, s in zip(files, strengths)]
    md = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture(pred),
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": out.stem,
        "modelspec.date": datetime.now(timezone.utc).isoformat(),
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{base.default_resolution}x{base.default_resolution}",
        "sdlora_tool": json.dumps({"operation": "merge", "precision": precision,
                                   "base": {"model": Path(base_name).name, "model_hash": base.model_hash},
                                   "inputs": records}),
    }
    from ..formats.export import save_safetensors_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    written = save_safetensors_atomic(tensors, out, md)
    result = ToolResult(written, "merge")
    listing = ", ".join(f"{f.path.name} at {s:g}" for f, s in zip(files, strengths))
    result.notes.append(f"{family.label} base '{base_name}' + {listing}: {len(merged)} weights changed, {precision}")
    return result
