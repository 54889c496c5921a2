"""The kohya/LyCORIS file layout, read side: group a file's tensors by module, tell the algorithm of each module, check
its shapes, and compute the weight change it makes -- the way ComfyUI's and AUTOMATIC1111's loaders compute it.

This is the one reference for what a file *means*. verify compares the trained model against it, generate/Try apply
files through it, and the LoRA tools (merge, resize, extract) read and write through it.

Per module (prefix `lora_unet_…`/`lora_te…_…`), with `s` = strength and W the base weight:
  LoRA/LoCon  ΔW = (alpha/r) · up @ down                  (`lora_mid` = Tucker core of a conv: up · mid · down)
  LoHa        ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)   (`hada_t1/t2`: Tucker cores)
  LoKr        ΔW = scale · w1 ⊗ w2, each factor full or `_a @ _b`; scale = alpha/r when a factor is decomposed, else 1
  DoRA        (`dora_scale` beside any of them): W' = dora_scale · (W + ΔW) / ‖W + ΔW‖ per input column
  at strength s the weight is W + s · (W' − W) for all of them.
"""

from __future__ import annotations

import torch

# Every tensor name a module may carry, longest first so "lokr_w1_a" is not read as "lokr_w1".
PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
         "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
         "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2")
_BY_LENGTH = sorted(PARTS, key=len, reverse=True)
ALGOS = ("lora", "loha", "lokr")


def part_name(suffix: str) -> str:
    """'lora_down.weight' -> 'lora_down' (the short name groups use)."""
    return suffix.split(".")[0]


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module prefix: {part: tensor}}; a key that is no known part lands under 'unknown'."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix in _BY_LENGTH:
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[part_name(suffix)] = value
                break
        else:
            groups.setdefault(key, {})["unknown"] = value
    return groups


def algo_of(parts: dict) -> str | None:
    if "lora_down" in parts or "lora_up" in parts:
        return "lora"
    if any(k.startswith("hada_") for k in parts):
        return "loha"
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    return None


def _rank_scale(alpha, rank: int) -> float:
    return float(alpha) / rank if alpha is not None else 1.0


def _tucker(core, b, a):
    # core: r×r×k×k (kept as LyCORIS stores it), b: r×in, a: out×r -> out×in×k×k
    return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a).contiguous()


def _lora(p, shape):
    down, up = p["lora_down"].float(), p["lora_up"].float()
    rank = down.shape[0]
    if "lora_mid" in p:
        mid = p["lora_mid"].float()
        delta = _tucker(mid, down.flatten(1), up.flatten(1).T)  # up is out×r; the core contracts its rank axis
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return delta.reshape(shape), _rank_scale(p.get("alpha"), rank)


def _loha(p, shape):
    w1a, w1b, w2a, w2b = (p[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in p:
        m1 = _tucker(p["hada_t1"].float(), w1b, w1a)
        m2 = _tucker(p["hada_t2"].float(), w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return (m1 * m2).reshape(shape), _rank_scale(p.get("alpha"), w1b.shape[0])


def _lokr(p, shape):
    rank = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"].float()
    else:
        rank = p["lokr_w1_b"].shape[0]
        w1 = p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    else:
        rank = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"].float(), p["lokr_w2_b"].float(), p["lokr_w2_a"].float())
        else:
            w2 = p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = _rank_scale(p.get("alpha"), rank) if rank is not None else 1.0
    return torch.kron(w1, w2).reshape(shape), scale


_DIFF = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def decomposed_delta(parts: dict, weight: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1 before any DoRA rescaling: scale · (the algorithm's product), fp32, shaped like `weight`."""
    algo = algo_of(parts)
    if algo is None:
        raise ValueError("no LoRA/LoHa/LoKr tensors in this module")
    diff, scale = _DIFF[algo](parts, tuple(weight.shape))
    return diff * scale


def module_delta(parts: dict, weight: torch.Tensor) -> torch.Tensor:
    """W' − W at strength 1 (fp32); strength s adds s times this, in every loader."""
    w = weight.float()
    delta = decomposed_delta(parts, w)
    if "dora_scale" not in parts:
        return delta
    merged = w + delta
    # Per input column: the norm runs over the output axis (and the kernel), as kohya/LyCORIS store dora_scale (1, in, …).
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (parts["dora_scale"].float() / norm) - w


def merged_weight(parts: dict, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W + s·ΔW in W's dtype: the weight a loader bakes the module into at strength s (W itself is not changed)."""
    return weight + (strength * module_delta(parts, weight)).to(weight.dtype)


def alpha_problem(parts: dict) -> str | None:
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        return f"alpha has shape {tuple(alpha.shape)}; it must be a single number"
    return None


def pair_problem(parts: dict) -> str | None:
    """Why a LoRA/LoCon module's lora_down/lora_up are no LoRA pair on their own (no base weight needed), or None."""
    down, up = parts.get("lora_down"), parts.get("lora_up")
    if down is None or up is None:
        return "needs both lora_down and lora_up"
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return f"lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not a linear (2-d) or conv (4-d) LoRA pair"
    if down.shape[0] == 0 or down.numel() == 0 or up.numel() == 0:
        return f"rank 0 (empty lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)})"
    if up.shape[1] != down.shape[0]:
        return f"lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}: lora_down has rank {down.shape[0]}"
    if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"a conv lora_up must be out x rank x 1 x 1, not {tuple(up.shape)}"
    return None


def shape_problem(parts: dict, weight_shape: tuple) -> str | None:
    """Why this module's tensors cannot apply to a weight of `weight_shape`, or None."""
    try:
        algo = algo_of(parts)
        if algo is None:
            return "no lora_down/lora_up, hada_* or lokr_* tensors"
        if algo == "lora":
            problem = pair_problem(parts)
            if problem:
                return problem
            down, up = parts["lora_down"], parts["lora_up"]
            if "lora_mid" not in parts and (down.shape[1] != weight_shape[1] or up.shape[0] != weight_shape[0]):
                return (f"shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the module weight "
                        f"{tuple(weight_shape)}")
        problem = alpha_problem(parts)
        if problem:
            return problem
        delta = _DIFF[algo](parts, (-1,))[0]
        if delta.numel() != torch.Size(weight_shape).numel():
            return f"its weights make {delta.numel()} values, the module weight {tuple(weight_shape)} has {torch.Size(weight_shape).numel()}"
        scale = parts.get("dora_scale")
        if scale is not None and scale.numel() != weight_shape[1]:
            return (f"dora_scale {tuple(scale.shape)} does not fit {weight_shape[1]} input features "
                    "(sdlora and kohya/LyCORIS files store one magnitude per input column)")
    except KeyError as exc:
        return f"missing {exc.args[0]}"
    except RuntimeError as exc:  # shapes that cannot multiply
        return f"shapes do not fit together ({str(exc).splitlines()[0]})"
    return None


def diffusers_reads(parts: dict) -> bool:
    """Plain LoRA/LoCon: what diffusers' kohya loader computes exactly (it has no LoHa, LoKr, DoRA or Tucker cores)."""
    return algo_of(parts) == "lora" and "dora_scale" not in parts and "lora_mid" not in parts


def diffusers_reads_all(groups: dict[str, dict]) -> bool:
    """Whether diffusers' loader (and so the diffusers/PEFT file format) holds every module of a file."""
    return all(diffusers_reads(p) for p in groups.values() if "unknown" not in p)


def describe_algos(groups: dict[str, dict]) -> str:
    """'LoRA', 'LoHa', 'LoKr', with '+DoRA' / '+Tucker' when present: what a file holds, for reports."""
    algos = {algo_of(p) for p in groups.values()} - {None}
    names = [{"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[a] for a in ALGOS if a in algos]
    if any("dora_scale" in p for p in groups.values()):
        names.append("DoRA")
    if any(k in p for p in groups.values() for k in ("lora_mid", "hada_t1", "lokr_t2")):
        names.append("Tucker")
    return "+".join(names) or "nothing"


def module_rank(parts: dict) -> int | None:
    algo = algo_of(parts)
    if algo == "lora" and "lora_down" in parts:
        return int(parts["lora_down"].shape[0])
    if algo == "loha" and "hada_w1_b" in parts:
        return int(parts["hada_w1_b"].shape[0])
    if algo == "lokr":
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in parts:
                return int(parts[key].shape[0])
    return None
