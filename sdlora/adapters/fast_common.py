"""What the fast LoHa/LoKr/LoCon/DoRA forwards share: when a layer can take one, and the reference's random draws.

The fast modules subclass LyCORIS's and keep its parameters, names and shapes; only `forward` changes. They draw
module dropout and rank dropout from the same generators, in the same order and shape, as the reference forward, so
a seeded run computes the same thing either way. A layer the fast math does not cover calls the reference forward.
"""

from __future__ import annotations

import os

import torch
from torch import nn

REFERENCE_ENV = "SDLORA_REFERENCE_ADAPTERS"
"""Set to 1 to build LyCORIS's own modules (the reference path), e.g. to compare speed or numerics."""


def reference_forced() -> bool:
    return os.environ.get(REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes")


def layer_supported(module) -> bool:
    """A plain, frozen nn.Linear or zero-padded, ungrouped nn.Conv2d, in LyCORIS's weight-rebuild mode: the layer the
    fast math is written for. Anything else (quantized layers, bypass mode, grouped or 1d/3d convs, a trainable
    `scalar`, a base layer with its own forward) keeps the reference forward."""
    if module.bypass_mode or module.is_quant or module.peft_wrapper is not None:
        return False
    if isinstance(module.scalar, nn.Parameter):
        return False
    layer = module.org_module[0]
    if type(layer).forward is nn.Linear.forward:
        plain = module.module_type == "linear"
    elif type(layer).forward is nn.Conv2d.forward:
        plain = module.module_type == "conv2d" and layer.groups == 1 and layer.padding_mode == "zeros" \
            and not isinstance(layer.padding, str)
    else:
        plain = False
    return plain and not layer.weight.requires_grad and not (layer.bias is not None and layer.bias.requires_grad)


def module_dropped(module) -> bool:
    """The reference's module dropout: one torch.rand(1) draw per training forward."""
    return bool(module.module_dropout and module.training and torch.rand(1) < module.module_dropout)


def row_mask(module, rows: int, device, on_device: bool) -> torch.Tensor | None:
    """The reference's rank dropout: a keep-mask over the rows (output channels) of ΔW, drawn like its make_weight
    (LoCon draws on the input's device, LoHa/LoKr on the CPU generator)."""
    if not (module.training and module.rank_dropout):
        return None
    draw = torch.rand(rows, device=device) if on_device else torch.rand(rows)
    mask = (draw > module.rank_dropout).float()
    if module.rank_dropout_scale:
        mask /= mask.mean()
    return mask.to(device)


def per_out_channel(y: torch.Tensor, v: torch.Tensor, conv: bool) -> torch.Tensor:
    """y scaled per output channel (the last axis of a linear's output, axis 1 of a conv's)."""
    return y * (v.view(-1, 1, 1) if conv else v).to(y.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul/conv in for this input."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def conv_args(layer: nn.Conv2d) -> dict:
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


class _Recomputed(torch.autograd.Function):
    """fn(x, *params) keeping only its inputs for backward, where fn runs again under the forward's autocast state
    (a checkpoint of one small branch, without torch.utils.checkpoint's nesting rules). fn must not draw random
    numbers: the masks are drawn outside it."""

    @staticmethod
    def forward(ctx, fn, x, *params):
        ctx.fn, ctx.kind = fn, x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.kind)
        ctx.dtype = torch.get_autocast_dtype(ctx.kind) if ctx.autocast else None
        ctx.save_for_backward(x, *params)
        return fn(x, *params)

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, *params), ctx.needs_input_grad[1:])]
        with torch.enable_grad(), torch.autocast(ctx.kind, dtype=ctx.dtype, enabled=ctx.autocast):
            out = ctx.fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, *[next(grads) if t.requires_grad else None for t in leaves])


def recomputed(fn, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """fn(x, *params) whose intermediates are rebuilt in backward instead of kept (see _Recomputed)."""
    if not torch.is_grad_enabled():
        return fn(x, *params)
    return _Recomputed.apply(fn, x, *params)
