"""resize: lower a LoRA's rank by SVD of each module's weight change, at a fixed rank or by kohya's dynamic rules
(sv_ratio, sv_fro, sv_cumulative), keeping what strength 1 means (alpha/rank carried over)."""

from __future__ import annotations

from pathlib import Path

from . import common
from .common import Progress, ToolError, ToolResult, no_progress


def resize_lora(path, out, *, rank: int, conv_rank: int | None = None, method: str = "rank", param: float | None = None,
                precision: str | None = None, base_model=None, progress: Progress = no_progress) -> ToolResult:
    """Write `path` resized to `out`. rank: the rank of linear and 1×1 modules (the cap for dynamic methods); conv_rank:
    the same for 3×3 convolutions (default: rank). precision: fp16/bf16/fp32 (default: the input's). base_model
    (a loaded BaseModel): needed only for LoHa/LoKr inputs, whose kernel sizes the factors do not tell; their
    modules come out as LoRA/LoCon. A DoRA module keeps its dora_scale, its direction part is resized."""
    common.check_method(method, param)
    conv_rank = rank if conv_rank is None else conv_rank
    if int(rank) < 1 or int(conv_rank) < 1:
        raise ToolError(f"rank {rank} / conv rank {conv_rank}: give ranks of 1 or more.")
    src = common.read_lora_file(path)
    out = common.check_output(out, [src.path])
    precision = precision or common.file_precision(src.tensors)
    common.check_precision(precision)
    shapes = common.module_shapes(src, common.base_shapes(base_model) if base_model is not None else None)
    tensors, reports, factors = {}, [], {}
    total = len(src.modules)
    for i, (prefix, parts) in enumerate(sorted(src.modules.items())):
        progress(i, total, prefix)
        shape = shapes[prefix]
        delta = common.module_delta(parts, shape, f"'{src.path.name}' {prefix}")
        old_rank = common.lycoris.module_rank(parts) or 0
        cap = conv_rank if common.is_conv3(shape) else rank
        down, up, report = common.low_rank(delta, int(cap), method, param, name=prefix)
        report.rank_in = old_rank
        reports.append(report)
        factors[prefix] = (down, up)
        if "dora_scale" in parts:
            tensors[f"{prefix}.dora_scale"] = parts["dora_scale"]
    progress(total, total, "writing")
    # kohya's rule: the input's alpha/rank is kept, so alpha = that ratio x the new rank (ss_network_dim's: the
    # largest of the linear and 1x1 modules, the convs' when there are only convs).
    linear = [d.shape[0] for p, (d, _) in factors.items() if not common.is_conv3(shapes[p])]
    alpha = common.file_scale(src) * max(linear or [d.shape[0] for d, _ in factors.values()])
    for prefix, (down, up) in factors.items():
        common.put_module(tensors, prefix, down, up, alpha)
    settings = {"rank": int(rank), "conv_rank": int(conv_rank), "method": method}
    if method != "rank":
        settings["param"] = param
    old = max((r.rank_in for r in reports), default=0)
    how = f"dynamic resize with {method} {param:g}" if method != "rank" else f"resized to rank {rank}"
    md = {k: v for k, v in src.metadata.items() if not k.startswith("sshs_")}
    comment = f"{how} from rank {old} by sdlora; {src.metadata.get('ss_training_comment', '')}".rstrip("; ")
    tool = {"operation": "resize", **settings, "inputs": [common.input_record(src.path)]}
    new_md = common.lora_metadata(src.family, [src.metadata], out, tool=tool, comment=comment)
    md.update(new_md)
    written = common.write_lora(tensors, Path(out), md, precision)
    result = ToolResult(written, "resize", reports)
    result.notes.append(f"{len(reports)} modules, {how}")
    return result
