"""combine: several LoRAs, each with a weight, into one file: exactly (ranks concatenated: the effect is the weighted
sum of the inputs' effects) or by SVD to a target rank (kohya's svd_merge_lora, with its dynamic rules too)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import common
from .common import Delta, Progress, ToolError, ToolResult, no_progress

MODES = ("concat", "svd")


def combine_loras(inputs: list[tuple[str | Path, float]], out, *, mode: str = "concat", rank: int | None = None,
                  conv_rank: int | None = None, method: str = "rank", param: float | None = None,
                  precision: str | None = None, base_model=None, progress: Progress = no_progress) -> ToolResult:
    """Write Σ weight·effect of the input LoRAs as one LoRA/LoCon file. mode "concat": exact, a module's rank is the
    sum of its inputs' ranks (inputs that are not LoRA/LoCon are decomposed exactly); mode "svd": each module's sum
    cut to `rank` (3×3 convs: `conv_rank`) or by a dynamic method. DoRA inputs are refused: their effect depends on
    the base weight, so a sum of them is no LoRA (merge them into the model instead)."""
    if mode not in MODES:
        raise ToolError(f"Combine mode '{mode}': use concat (exact) or svd (to a rank).")
    if len(inputs) < 1:
        raise ToolError("Combine needs at least one LoRA file (two or more to be useful).")
    if mode == "svd":
        common.check_method(method, param)
        if rank is None or int(rank) < 1:
            raise ToolError("Combine by SVD needs --rank (the rank, or the cap for a dynamic method), 1 or more.")
    files = [common.read_lora_file(p) for p, _ in inputs]
    weights = [float(w) for _, w in inputs]
    out = common.check_output(out, [f.path for f in files])
    family = common.same_family(files)
    shapes_base = common.base_shapes(base_model) if base_model is not None else None
    shapes = {}
    for f in files:
        for prefix, shape in common.module_shapes(f, shapes_base).items():
            seen = shapes.setdefault(prefix, shape)
            if common.torch.Size(seen).numel() != common.torch.Size(shape).numel():
                raise ToolError(f"LoRA {common._q(f.path)} has {prefix} for a weight of shape {shape}, but "
                                f"{common._q(files[0].path)} for {seen}: these LoRAs are for different models.")
        dora = [p for p, parts in f.modules.items() if "dora_scale" in parts]
        if dora:
            raise ToolError(f"LoRA {common._q(f.path)} is a DoRA file (e.g. {dora[0]}): its effect depends on the base "
                            "weights, so it cannot be summed into a LoRA. Merge it into the model instead (merge).")
    precision = precision or common.file_precision(files[0].tensors)
    common.check_precision(precision)
    conv_rank = conv_rank or rank
    tensors, reports, factors = {}, [], {}
    names = sorted(shapes)
    for i, prefix in enumerate(names):
        progress(i, len(names), prefix)
        shape = shapes[prefix]
        terms = [common.module_delta(f.modules[prefix], shape, f"'{f.path.name}' {prefix}").scaled(w)
                 for f, w in zip(files, weights) if prefix in f.modules and w != 0]
        rank_in = sum(common.lycoris.module_rank(f.modules[prefix]) or 0 for f in files if prefix in f.modules)
        if not terms:
            continue
        total = Delta.total(terms)
        if mode == "concat" and total.factored:
            r = total.down.shape[0]
            down, up = total.down, total.up
            if len(shape) == 4:
                down, up = down.reshape(r, *shape[1:]), up.reshape(shape[0], r, 1, 1)
            report = common.ModuleReport(prefix, rank_in, r, 1.0, 1.0, float("nan"))
        elif mode == "concat":  # a LoHa/LoKr/Tucker term: an exact decomposition, noise-level singular values dropped
            down, up, report = common.low_rank(total, 1 << 30, name=prefix, drop_noise=True)
        else:
            cap = conv_rank if common.is_conv3(shape) else rank
            down, up, report = common.low_rank(total, int(cap), method, param, name=prefix)
        report.rank_in = rank_in
        reports.append(report)
        factors[prefix] = (down, up)
    if not factors:
        raise ToolError("Nothing to combine: every weight is 0.")
    # One alpha for the file: the target rank, or (exact mode) the largest rank, so strength 1 is the sum of effects.
    alpha = float(rank if mode == "svd" else max(d.shape[0] for d, _ in factors.values()))
    for prefix, (down, up) in factors.items():
        common.put_module(tensors, prefix, down, up, alpha)
    progress(len(names), len(names), "writing")
    records = [common.input_record(f.path, {"weight": w}) for f, w in zip(files, weights)]
    settings = {"mode": mode}
    if mode == "svd":
        settings.update(rank=int(rank), conv_rank=int(conv_rank), method=method)
        if method != "rank":
            settings["param"] = param
    tool = {"operation": "combine", **settings, "inputs": records}
    listing = " + ".join(f"{w:g} x {f.path.name}" for f, w in zip(files, weights))
    comment = f"combined by sdlora ({'exact' if mode == 'concat' else 'SVD'}): {listing}"
    md = common.lora_metadata(family, [f.metadata for f in files], out, tool=tool, comment=comment)
    written = common.write_lora(tensors, Path(out), md, precision)
    result = ToolResult(written, "combine", reports)
    result.notes.append(f"{len(files)} LoRAs, {len(reports)} modules: {listing}")
    return result
