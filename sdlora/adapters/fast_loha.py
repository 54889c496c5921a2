"""LoHa without keeping its full-size weight for backward.

LoHa's ΔW = scale · (w1_a·w1_b) ⊙ (w2_a·w2_b) (or the Tucker rebuilds of each half) has no low-rank shortcut: the
layer needs ΔW. LyCORIS builds it every forward and autograd keeps it (and W + ΔW) until backward. Here one autograd
Function computes y = op(x, W + strength·ΔW) + bias and keeps only x and the factors: backward rebuilds ΔW, takes the
input gradient through W + strength·ΔW and the weight gradient of the op once, and hands that to the factors. So a
layer keeps LoRA's memory and costs one rebuild and one weight-gradient op more than the frozen layer.

Rank dropout masks ΔW's rows (drawn as the reference draws them), module dropout skips the layer. Falls back to the
reference forward for DoHa (weight_decompose) and for layers `layer_supported` rejects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.loha import LohaModule

from .fast_common import compute_dtype, conv_args, layer_supported, module_dropped, row_mask


def _halves(factors: tuple, row: torch.Tensor, tucker: bool, shape: tuple):
    """The two halves whose product is ΔW (LyCORIS's diff_weight), in the layer's weight shape, the first with ΔW's
    per-row factor (scale · strength, rank-dropout mask) folded into w1_a so that it costs nothing full-size."""
    if tucker:
        t1, w1a, w1b, t2, w2a, w2b = factors
        h1 = torch.einsum("ij...,jr,ip->pr...", t1, w1b, w1a * row)
        h2 = torch.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
    else:
        w1a, w1b, w2a, w2b = factors
        h1, h2 = (w1a * row[:, None]) @ w1b, w2a @ w2b
    return h1.reshape(shape), h2.reshape(shape)


def _total(weight: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """W + ΔW in one pass over the full-size tensors."""
    return torch.addcmul(weight, h1.to(weight.dtype), h2.to(weight.dtype))


class _HadaLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row, conv, tucker, *factors):
        ctx.kind = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.kind)
        ctx.dtype = compute_dtype(x)
        ctx.conv, ctx.tucker = conv, tucker
        w = _total(weight, *_halves(factors, row, tucker, weight.shape)).to(ctx.dtype)
        ctx.save_for_backward(x, weight, row, *factors)
        b = None if bias is None else bias.to(ctx.dtype)
        if conv is not None:
            return F.conv2d(x.to(ctx.dtype), w, b, **conv)
        return F.linear(x.to(ctx.dtype), w, b)

    @staticmethod
    def backward(ctx, grad):
        x, weight, row, *factors = ctx.saved_tensors
        # Grad mode only where autograd does the work (Tucker): under it the memory trace's fake tensors keep each
        # layer's rebuilt halves alive to the end of backward, which a real step does not.
        with torch.autocast(ctx.kind, dtype=ctx.dtype, enabled=ctx.autocast), torch.set_grad_enabled(ctx.tucker):
            leaves = [f.detach().requires_grad_(ctx.tucker) for f in factors]
            h1, h2 = _halves(tuple(leaves), row, ctx.tucker, weight.shape)
            grad_x, grad_w = _layer_grads(ctx, grad, x, _total(weight, h1.detach(), h2.detach()).to(ctx.dtype))
            if ctx.tucker:  # the Tucker rebuild's own backward, through autograd
                grads = torch.autograd.grad(h1 * h2, leaves, grad_w.to(h1.dtype))
            else:  # ∂/∂h1 = G ⊙ h2, ∂/∂h2 = G ⊙ h1, then the two low-rank products (LyCORIS's HadaWeight backward)
                w1a, w1b, w2a, w2b = leaves
                g = grad_w.reshape(h1.shape[0], -1)
                h1, h2 = h1.detach().reshape(g.shape), h2.detach().reshape(g.shape)
                t = g * h2.to(g.dtype)
                grad_w1a, grad_w1b = (t @ w1b.t()) * row[:, None], (w1a * row[:, None]).t() @ t
                t = g * h1.to(g.dtype)
                grads = (grad_w1a, grad_w1b, t @ w2b.t(), w2a.t() @ t)
        grads = [gr.to(f.dtype) for gr, f in zip(grads, factors)]
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        return (grad_x, None, None, None, None, None, *grads)


def _layer_grads(ctx, grad, x, w):
    """The op's input gradient (if wanted) and weight gradient at the total weight, in the forward's dtype."""
    g, xc = grad.to(ctx.dtype), x.to(ctx.dtype)
    if ctx.conv is not None:
        kw = ctx.conv
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            g, xc, w, None, kw["stride"], kw["padding"], kw["dilation"], False, [0, 0], 1,
            [ctx.needs_input_grad[0], True, False])
        return grad_x, grad_w
    grad_x = (g @ w) if ctx.needs_input_grad[0] else None
    return grad_x, g.reshape(-1, g.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])


class FastLohaModule(LohaModule):
    """LyCORIS's LohaModule (same parameters, file layout, init), forward through `_HadaLayer`."""

    def _fast_ok(self) -> bool:
        return layer_supported(self) and not self.wd

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self._fast_ok():
            return super().forward(x, *args, **kwargs)
        if module_dropped(self):
            return self.org_forward(x, *args, **kwargs)
        layer = self.org_module[0]
        mask = row_mask(self, self.shape[0], x.device, on_device=False)
        row = (self.scalar.to(x.device) * (self.scale * self.multiplier)).float().expand(self.shape[0])
        row = row if mask is None else row * mask
        factors = ((self.hada_t1, self.hada_w1_a, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b)
                   if self.tucker else (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        conv = conv_args(layer) if self.module_type == "conv2d" else None
        return _HadaLayer.apply(x, layer.weight, layer.bias, row, conv, self.tucker, *factors)


__all__ = ["FastLohaModule"]
