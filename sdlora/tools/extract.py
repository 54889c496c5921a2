"""extract: a LoRA from the difference between a fine-tuned model and its base (SVD of each module's ΔW), for the
UNet and the text encoders; the module set is kohya's (attention/transformer layers, text-encoder attention and MLP,
and with a conv rank every ResNet/down/upsampler layer)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..formats.kohya_names import is_text_encoder_prefix
from ..formats.lora_file import base_layer, module_index
from . import common
from .common import Delta, Progress, ToolError, ToolResult, no_progress

# kohya's targets: Transformer2DModel everywhere; with a conv rank also ResnetBlock2D, Downsample2D and Upsample2D.
_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
_RESNET = re.compile(r"(^|\.)(resnets|downsamplers|upsamplers)\.\d+\.")


def _load(model, what: str):
    if isinstance(model, (str, Path)):
        from ..models import load_base_model

        return load_base_model(str(model))
    return model


def _weight(components, target):
    return base_layer(components, target).weight


def extract_lora(tuned, base, out, *, rank: int, conv_rank: int = 0, method: str = "rank", param: float | None = None,
                 min_diff: float = 0.0, text_encoders: bool = True, precision: str = "fp16",
                 progress: Progress = no_progress) -> ToolResult:
    """Write a LoRA whose effect on `base` approximates `tuned` − `base` (both a model spec or a loaded BaseModel).
    rank: for Linear/1×1 modules (the cap for dynamic methods); conv_rank > 0 adds the 3×3 convs of the ResNet
    blocks at that rank; min_diff: modules whose largest change is at most this are left out (0: only unchanged ones);
    text_encoders False: UNet only."""
    common.check_method(method, param)
    common.check_precision(precision)
    if int(rank) < 1 or int(conv_rank) < 0:
        raise ToolError(f"rank {rank} / conv rank {conv_rank}: the rank must be 1 or more, the conv rank 0 (no 3x3 "
                        "convs) or more.")
    out = common.check_output(out, [p for p in (tuned, base) if isinstance(p, (str, Path))])
    tuned_name = str(tuned) if isinstance(tuned, (str, Path)) else getattr(tuned, "source", "fine-tuned model")
    base_name = str(base) if isinstance(base, (str, Path)) else getattr(base, "source", "base model")
    tuned, base = _load(tuned, "fine-tuned model"), _load(base, "base model")
    if tuned.family.name != base.family.name:
        raise ToolError(f"The fine-tuned model '{tuned_name}' is {tuned.family.label} but the base model '{base_name}' is "
                        f"{base.family.label}: extract needs the model a fine-tune started from.")
    family = base.family
    comps_b, comps_t = base.components(), tuned.components()
    if not text_encoders:
        comps_b, comps_t = {"unet": comps_b["unet"]}, {"unet": comps_t["unet"]}
    index_b, index_t = module_index(family, comps_b), module_index(family, comps_t)
    chosen = []
    for prefix, target in sorted(index_b.items()):
        component, path = target
        w = _weight(comps_b, target)
        if component == "unet":
            conv3 = w.dim() == 4 and tuple(w.shape[2:]) != (1, 1)
            if not (_TRANSFORMER.search(path) or (conv_rank and _RESNET.search(path))):
                continue
        else:
            conv3 = False
        if prefix not in index_t or tuple(_weight(comps_t, index_t[prefix]).shape) != tuple(w.shape):
            raise ToolError(f"The fine-tuned model '{tuned_name}' does not match the base model '{base_name}' at {prefix}: "
                            "they are not the same architecture (a fine-tune and the model it started from).")
        chosen.append((prefix, target, conv3))
    tensors, reports, unchanged = {}, [], 0
    for i, (prefix, target, conv3) in enumerate(chosen):
        progress(i, len(chosen), prefix)
        with torch.no_grad():
            diff = _weight(comps_t, index_t[prefix]).float() - _weight(comps_b, target).float()
        if float(diff.abs().max()) <= min_diff:
            unchanged += 1
            continue
        delta = Delta(tuple(diff.shape), dense=diff.flatten(1))
        cap = conv_rank if conv3 else rank
        down, up, report = common.low_rank(delta, int(cap), method, param, name=prefix)
        report.rank_in = min(delta.dense.shape)
        reports.append(report)
        common.put_module(tensors, prefix, down, up, float(rank))  # alpha = rank, as kohya's extract writes
    progress(len(chosen), len(chosen), "writing")
    if not tensors:
        raise ToolError(f"'{tuned_name}' and '{base_name}' do not differ in any module a LoRA adapts (largest change "
                        f"at most {min_diff:g}): there is nothing to extract.")
    settings = {"rank": int(rank), "conv_rank": int(conv_rank), "method": method, "min_diff": min_diff,
                "text_encoders": bool(text_encoders)}
    if method != "rank":
        settings["param"] = param
    tool = {"operation": "extract", **settings,
            "inputs": [{"model": Path(tuned_name).name, "role": "fine-tuned", "model_hash": tuned.model_hash},
                       {"model": Path(base_name).name, "role": "base", "model_hash": base.model_hash}]}
    pred = getattr(base, "prediction_type", "epsilon")
    base_md = {"ss_sd_model_name": base.name, "ss_sd_model_hash": base.model_hash, "ss_prediction_type": pred,
               "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
               "ss_network_train_unet_only": str(not any(is_text_encoder_prefix(k) for k in tensors))}
    md = common.lora_metadata(family, [], out, tool=tool, base=base_md,
                              comment=f"extracted by sdlora from {Path(tuned_name).name} - {Path(base_name).name}")
    written = common.write_lora(tensors, Path(out), md, precision)
    result = ToolResult(written, "extract", reports)
    result.notes.append(f"{len(reports)} modules extracted, {unchanged} unchanged left out")
    return result
