"""What the LoRA tools share: reading and checking input files, a module's weight change as low-rank factors or a
dense matrix, SVD with kohya's rank rules, and writing a LoRA file with metadata that records what was done.

A file's meaning is `sdlora.formats.lycoris`'s: the tools compute the same weight change ComfyUI/A1111 apply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..adapters.spec import AdapterSpec
from ..errors import UserError
from ..families import family_of_lora
from ..formats import lycoris
from ..formats.diffusers_lora import diffusers_to_kohya
from ..formats.export import PRECISIONS, save_safetensors_atomic, tensors_hash, with_hashes
from ..formats.lora_file import describe_family, detect_format, module_index, read_lora
from ..safetext import shown

# progress(done, total, what): called as modules are processed; the CLI prints it, the UI shows it.
Progress = Callable[[int, int, str], None]
from . import METHODS
# Singular values below this fraction of the largest are numerical noise of an exact decomposition.
_NOISE = 1e-7


class ToolError(UserError, ValueError):
    """A LoRA tool cannot do what was asked; the message names the file and what to do."""


def no_progress(done: int, total: int, what: str) -> None:
    pass


def _q(path) -> str:
    return f"'{shown(str(path))}'"


# --- reading ------------------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    path: Path
    tensors: dict
    metadata: dict
    modules: dict  # kohya prefix -> {part: tensor}
    family: object  # ModelFamily or None when the keys do not tell


def read_lora_file(path, what: str = "LoRA") -> LoraFile:
    """A kohya/LyCORIS file (a diffusers-format one is converted), refused with a sentence naming it when it is not a
    LoRA or its tensors are broken."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"{what} {_q(path)} is not a .safetensors file: the LoRA tools read LoRAs in safetensors format.")
    tensors, metadata = read_lora(path)
    if not tensors:
        raise ToolError(f"{what} {_q(path)} holds no tensors: it is not a LoRA.")
    fmt = detect_format(tensors)
    if fmt == "diffusers":
        family = family_of_lora(list(tensors))
        tensors = diffusers_to_kohya(tensors, metadata, family, source=path)
    elif fmt != "kohya":
        what_is = describe_family(tensors)
        kind = f"a LoRA for {what_is}" if what_is else ("a model checkpoint" if any(
            k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in tensors)
            else "not a kohya/LyCORIS LoRA")
        raise ToolError(f"{what} {_q(path)} is {kind}; the LoRA tools take SD1/SD2/SDXL LoRA files.")
    other = describe_family(tensors)
    if other and other.startswith("a transformer"):
        raise ToolError(f"{what} {_q(path)} is a LoRA for {other}, not for SD1/SD2/SDXL.")
    modules = lycoris.group_modules(tensors)
    for prefix, parts in modules.items():
        if "unknown" in parts:
            raise ToolError(f"{what} {_q(path)} has a tensor sdlora does not know ({prefix}): it is not a "
                            "kohya/LyCORIS LoRA, or a kind of module the tools do not handle.")
        problem = _parts_problem(parts)
        if problem:
            raise ToolError(f"{what} {_q(path)} is damaged at {prefix}: {problem}.")
    return LoraFile(path, tensors, metadata, modules, family_of_lora(list(tensors)))


def _parts_problem(parts: dict) -> str | None:
    bad = [k for k, v in parts.items() if not v.is_floating_point() or not bool(torch.isfinite(v.float()).all())]
    if bad:
        return f"{bad[0]} is not finite floating-point numbers"
    if lycoris.algo_of(parts) is None:
        return "no lora_down/lora_up, hada_* or lokr_* tensors"
    if lycoris.algo_of(parts) == "lora":
        problem = lycoris.pair_problem(parts)
        if problem:
            return problem
    return lycoris.alpha_problem(parts)


def same_family(files: list[LoraFile]) -> object:
    """The family all inputs are for; refuses a mix (SD1 with SDXL) naming the odd file."""
    known = [f for f in files if f.family is not None]
    if not known:
        return None
    first = known[0]
    for f in known[1:]:
        if not f.family.lora_compatible_with(first.family):
            raise ToolError(f"LoRA {_q(f.path)} is for {f.family.label}, but {_q(first.path)} is for {first.family.label}: "
                            "LoRAs for different model families cannot be combined.")
    return first.family


# --- a module's weight change -----------------------------------------------------------------------------------
@dataclass
class Delta:
    """ΔW of one module, either as factors (up: out×r, down: r×in·k·k, ΔW = up @ down) or as a dense out×in·k·k
    matrix; `shape` is the module weight's shape."""

    shape: tuple
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        return self.dense is None

    def matrix(self) -> torch.Tensor:
        return self.up @ self.down if self.factored else self.dense

    def scaled(self, c: float) -> Delta:
        if self.factored:
            return Delta(self.shape, up=self.up * c, down=self.down)
        return Delta(self.shape, dense=self.dense * c)

    @staticmethod
    def total(deltas: list[Delta]) -> Delta:
        """The sum; stays factored (ranks concatenated, exact) when every term is."""
        shape = deltas[0].shape
        if all(d.factored for d in deltas):
            return Delta(shape, up=torch.cat([d.up for d in deltas], 1), down=torch.cat([d.down for d in deltas], 0))
        return Delta(shape, dense=sum(d.matrix() for d in deltas))


def is_conv3(shape) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def lora_shape(parts: dict) -> tuple | None:
    """A module's weight shape as its LoRA/LoCon factors tell it; None for LoHa/LoKr (their factors do not say a
    convolution's kernel size)."""
    if lycoris.algo_of(parts) != "lora":
        return None
    down, up = parts["lora_down"], parts["lora_up"]
    return (up.shape[0], *down.shape[1:])


def module_delta(parts: dict, shape: tuple, what: str) -> Delta:
    """ΔW at strength 1 without DoRA (the tools keep dora_scale apart, or refuse it), in float32."""
    algo = lycoris.algo_of(parts)
    if algo == "lora" and "lora_mid" not in parts:
        down, up = parts["lora_down"].float(), parts["lora_up"].float()
        alpha = parts.get("alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        return Delta(tuple(shape), up=up.flatten(1) * scale, down=down.flatten(1))
    problem = lycoris.shape_problem({k: v for k, v in parts.items() if k != "dora_scale"}, tuple(shape))
    if problem:
        raise ToolError(f"{what}: {problem}.")
    dense = lycoris.decomposed_delta(parts, torch.zeros(shape))
    return Delta(tuple(shape), dense=dense.flatten(1))


# --- SVD and kohya's rank rules ----------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    """What happened to one module: ranks before and after, and how much of its weight change was kept."""

    name: str
    rank_in: int
    rank_out: int
    fro_kept: float      # ‖kept singular values‖₂ / ‖all‖₂  (kohya's "fro retained")
    sum_kept: float      # Σ kept / Σ all                       (kohya's "sum(S) retained")
    max_ratio: float     # largest / smallest kept singular value

    def line(self) -> str:
        return (f"{self.name}: rank {self.rank_in} -> {self.rank_out}, kept {self.fro_kept:.2%} (Frobenius), "
                f"{self.sum_kept:.2%} (sum of singular values), max/min kept {self.max_ratio:.3g}")


def choose_rank(s: torch.Tensor, max_rank: int, method: str = "rank", param: float | None = None) -> int:
    """How many singular values (sorted, descending) to keep, as kohya's resize_lora.py decides: `rank` keeps
    max_rank; `sv_ratio` keeps those within a factor `param` of the largest; `sv_cumulative` the fewest whose sum
    reaches `param` of the total; `sv_fro` the fewest whose Frobenius norm reaches `param` of the whole. max_rank is
    the cap for every method; a zero change keeps rank 1."""
    s = s.double()
    n = len(s)
    if n == 0 or float(s[0]) <= 1e-12:
        return 1
    if method == "rank":
        keep = n
    elif method == "sv_ratio":
        keep = int((s > s[0] / param).sum())
    elif method in ("sv_cumulative", "sv_fro"):
        values = s if method == "sv_cumulative" else s * s
        target = param if method == "sv_cumulative" else param * param
        fraction = torch.cumsum(values, 0) / values.sum()
        # The fewest values reaching the target; a hair of slack so 1.0 means "all" despite rounding.
        keep = int((fraction < target - 1e-12).sum()) + 1
    else:
        raise ToolError(f"Unknown resize method '{method}': use one of {', '.join(METHODS)}.")
    return max(1, min(keep, n, max_rank))


def check_method(method: str, param: float | None) -> None:
    if method not in METHODS:
        raise ToolError(f"Unknown method '{method}': use one of {', '.join(METHODS)}.")
    if method == "rank":
        return
    if param is None or not math.isfinite(param):
        raise ToolError(f"Method {method} needs a value (--param), e.g. {'2' if method == 'sv_ratio' else '0.9'}.")
    if method == "sv_ratio" and param < 1:
        raise ToolError(f"sv_ratio {param:g}: give the largest allowed ratio of the biggest to the smallest kept singular "
                        "value, 1 or more (e.g. 2 to 20).")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise ToolError(f"{method} {param:g}: give the fraction to keep, above 0 and at most 1 (e.g. 0.9).")


def svd(delta: Delta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of ΔW. Factored changes go through QR of the factors (the SVD of a rank×rank core), which is exact
    and costs nothing like a full SVD of a large layer."""
    if delta.factored:
        qu, ru = torch.linalg.qr(delta.up)
        qd, rd = torch.linalg.qr(delta.down.T)
        u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
        return qu @ u, s, vh @ qd.T
    return torch.linalg.svd(delta.dense, full_matrices=False)


def low_rank(delta: Delta, max_rank: int, method: str = "rank", param: float | None = None, *,
             name: str = "", drop_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """(lora_down, lora_up) of at most max_rank whose product approximates ΔW, in the module's layout (convs
    r×in×k×k and out×r×1×1), with the singular values split evenly between them, and the report."""
    u, s, vh = svd(delta)
    keep = choose_rank(s, max_rank, method, param)
    if drop_noise and len(s) and float(s[0]) > 0:
        keep = min(keep, max(1, int((s > s[0] * _NOISE).sum())))
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    shape = delta.shape
    if len(shape) == 4:
        down = down.reshape(keep, *shape[1:])
        up = up.reshape(shape[0], keep, 1, 1)
    s64 = s.double()
    total, total_sq = float(s64.sum()), float((s64 * s64).sum())
    kept = s64[:keep]
    report = ModuleReport(
        name=name, rank_in=0, rank_out=keep,
        fro_kept=math.sqrt(float((kept * kept).sum()) / total_sq) if total_sq > 0 else 1.0,
        sum_kept=float(kept.sum()) / total if total > 0 else 1.0,
        max_ratio=float(s64[0] / s64[keep - 1]) if float(s64[keep - 1]) > 0 else float("inf"))
    return down.contiguous(), up.contiguous(), report


# --- writing ------------------------------------------------------------------------------------------------------
@dataclass
class ToolResult:
    path: Path
    operation: str
    modules: list[ModuleReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self, per_module: bool = True) -> str:
        lines = [f"{self.operation}: wrote {self.path}"] + list(self.notes)
        if self.modules and per_module:
            lines += [r.line() for r in self.modules]
        if self.modules:
            fro = [r.fro_kept for r in self.modules]
            lines.append(f"{len(self.modules)} modules; kept (Frobenius) mean {sum(fro) / len(fro):.2%}, "
                         f"lowest {min(fro):.2%}; ranks {min(r.rank_out for r in self.modules)}-"
                         f"{max(r.rank_out for r in self.modules)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "operation": self.operation, "notes": self.notes,
                "modules": [r.__dict__ for r in self.modules]}


def check_output(out, inputs=()) -> Path:
    from ..outputs import check_output_file

    out = check_output_file(Path(out), what="output file")
    if out.suffix.lower() != ".safetensors":
        raise ToolError(f"Output {_q(out)} must end in .safetensors.")
    for src in inputs:
        try:
            if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
                raise ToolError(f"Output {_q(out)} is also an input; write to a new file.")
        except OSError:
            continue
    return out


def input_record(path: Path, extra: dict | None = None) -> dict:
    """How the output's metadata names an input: file name and kohya's tensor-data hash (sshs_model_hash)."""
    rec = {"file": Path(path).name, "sshs_model_hash": tensors_hash(Path(path))}
    rec.update(extra or {})
    return rec


def _same(values: list) -> str:
    return str(values[0]) if values and all(v == values[0] for v in values) else "Dynamic"


def network_metadata(tensors: dict) -> dict[str, str]:
    """ss_network_* for what was written, as the adapter spec of such a file writes them: dim is the largest rank of the
    linear and 1x1 modules, conv_dim/conv_alpha those of the 3x3 convs; an alpha that differs between modules is
    kohya's "Dynamic"."""
    groups = lycoris.group_modules(tensors)
    linear, conv = [], []
    for parts in groups.values():
        rank = int(parts["lora_down"].shape[0])
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        (conv if is_conv3(parts["lora_down"].shape) else linear).append((rank, _num(alpha)))
    main = linear or conv
    spec = AdapterSpec(network="lora", rank=max(r for r, _ in main), alpha=_same([a for _, a in main]),
                       conv_rank=max(r for r, _ in conv) if conv and linear else 0,
                       conv_alpha=_same([a for _, a in conv]) if conv and linear else 1.0,
                       dora=any("dora_scale" in p for p in groups.values()))
    return spec.network_metadata()


def _num(x: float):
    return int(x) if float(x).is_integer() else round(float(x), 6)


# Keys that describe the base model a LoRA is for: kept when every input agrees on them.
_SHARED_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
                "ss_resolution", "ss_prediction_type", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type")


def lora_metadata(family, inputs: list[dict], out: Path, *, tool: dict, base: dict | None = None,
                  comment: str = "") -> dict[str, str]:
    """Metadata for a LoRA the tools wrote: what the inputs agree on about the base model (or the family's strings),
    the network shape, a title and date, and `sdlora_tool` (the operation, its settings and the inputs' hashes)."""
    md: dict[str, str] = {}
    for key in _SHARED_KEYS:
        values = [m.get(key) for m in inputs]
        if values and values[0] is not None and all(v == values[0] for v in values):
            md[key] = values[0]
    md.update(base or {})
    if family is not None:
        pred = "v_prediction" if md.get("ss_prediction_type") == "v_prediction" else "epsilon"
        for key, value in family.metadata(pred).items():
            md.setdefault(key, value)
        md.setdefault("modelspec.sai_model_spec", "1.0.0")
    md["modelspec.title"] = out.stem
    md["modelspec.date"] = datetime.now(timezone.utc).isoformat()
    md["ss_training_comment"] = comment
    md["sdlora_tool"] = json.dumps(tool)
    return md


def write_lora(tensors: dict, out: Path, metadata: dict[str, str], precision: str) -> Path:
    """Cast, add ss_network_* and kohya's hashes, write atomically."""
    dtype = PRECISIONS[precision]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    md = dict(metadata)
    md.update(network_metadata(tensors))
    md["ss_save_precision"] = precision
    out.parent.mkdir(parents=True, exist_ok=True)
    md = with_hashes(out, tensors, md)
    return save_safetensors_atomic(tensors, out, md)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ToolError(f"Precision '{precision}': choose fp16, bf16 or fp32.")


def file_precision(tensors: dict) -> str:
    """The precision a LoRA file was saved in (its down weights'), for outputs that keep it."""
    for key, value in tensors.items():
        if value.is_floating_point() and value.dim() >= 2:
            return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(value.dtype, "fp32")
    return "fp16"


# --- module shapes ------------------------------------------------------------------------------------------------
def base_shapes(base) -> dict[str, tuple]:
    """kohya prefix -> weight shape of every module of a loaded base model a LoRA may adapt."""
    components = base.components()
    shapes = {}
    for prefix, (component, path) in module_index(base.family, components).items():
        module = components[component].get_submodule(path)
        shapes[prefix] = tuple(getattr(module, "base_layer", module).weight.shape)
    return shapes


def module_shapes(f: LoraFile, shapes: dict | None, what: str = "LoRA") -> dict[str, tuple]:
    """Each module's weight shape: the base model's when one is given (refusing modules it lacks or cannot take),
    else what the LoRA/LoCon factors say."""
    out = {}
    for prefix, parts in sorted(f.modules.items()):
        own = lora_shape(parts)
        if shapes is not None:
            shape = shapes.get(prefix)
            if shape is None:
                raise ToolError(f"{what} {_q(f.path)} adapts {prefix}, which the base model does not have: the file was "
                                "made for another model (or family).")
            problem = lycoris.shape_problem(parts, shape)
            if problem:
                raise ToolError(f"{what} {_q(f.path)} does not fit the base model at {prefix}: {problem}.")
        elif own is None:
            raise ToolError(f"{what} {_q(f.path)} has LoHa/LoKr modules (e.g. {prefix}), whose factors do not tell a "
                            "convolution's kernel size: pass the base model (--base-model) so each module's shape is known.")
        else:
            shape = own
        out[prefix] = tuple(shape)
    return out


def put_module(tensors: dict, prefix: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    """Store factors whose product is the whole ΔW under one file-wide alpha: each module's alpha/rank is folded into
    its factors. One alpha per file because diffusers' loader mishandles per-module alphas (its alpha_pattern), while
    ranks may differ freely; ComfyUI and A1111 read either."""
    rank = down.shape[0]
    c = math.sqrt(rank / alpha)
    tensors[f"{prefix}.lora_down.weight"] = (down * c).contiguous()
    tensors[f"{prefix}.lora_up.weight"] = (up * c).contiguous()
    tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))


def file_scale(f: LoraFile) -> float:
    """The input's alpha/rank when all its modules share it (kohya's resize keeps it), else 1."""
    scales = set()
    for parts in f.modules.values():
        rank = lycoris.module_rank(parts)
        if rank and "alpha" in parts:
            scales.add(round(float(parts["alpha"]) / rank, 9))
        elif rank:
            scales.add(1.0)
    return scales.pop() if len(scales) == 1 and next(iter(scales)) > 0 else 1.0
