"""LoRA/LoCon (with rank or module dropout, Tucker cores) and DoRA without building the layer's full weight.

LyCORIS's LoConModule rebuilds ΔW (out × in·k·k) every forward and autograd keeps it. Here:

  LoCon  y = base(x) + multiplier · up(mid(down(x))), rank dropout as a mask on up's rows (ΔW's rows, where the
         reference masks them).
  DoRA   in the files' convention (`dora_scale` (1, in, 1, 1), wd_on_out=False) the decomposed weight is
         W' = (W + ΔW) · diag(s), s = m / (‖(W + ΔW)_c‖ + eps) per input channel c (for a conv, the norm over out and
         the kernel window of that channel, as LyCORIS computes it), so
             y = base(x ⊙ s) + lora(x ⊙ s)
         with the squared norms from the factors: ‖W_c‖² + 2·⟨W_c, ΔW_c⟩ + ‖ΔW_c‖², where ⟨W, up·A⟩ = ⟨upᵀW, A⟩ and
         ‖up·A‖² = ⟨(upᵀup)·A, A⟩ (A = down, Tucker core folded in: r × in·k·k). Only r × in tensors are built.
         The norm is NOT detached: gradients flow through it exactly as in LyCORIS (and kohya), so training
         numerics are the reference's. A strength ≠ 1 scales s as LyCORIS does: s' = strength·(s − 1) + 1.
         One autograd Function (`_DoraLayer`) keeps x, s and the factors and rebuilds x ⊙ s in backward, so a DoRA
         layer keeps what a LoRA layer keeps; ‖W_c‖² is computed once per frozen weight.

Falls back to the reference forward for DoRA with wd_on_out=True and for layers `layer_supported` rejects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.locon import LoConModule

from .fast_common import compute_dtype, conv_args, layer_supported, module_dropped, row_mask


def _chain(x: torch.Tensor, down, mid, up, conv: dict | None) -> torch.Tensor:
    """up(mid(down(x))) in the layer's own op; `up` is out × r, the layer's geometry on the k×k factor."""
    if conv is None:
        return F.linear(F.linear(x, down), up)
    if mid is not None:
        h = F.conv2d(F.conv2d(x, down), mid, **conv)
    else:
        h = F.conv2d(x, down, **conv)
    return F.conv2d(h, up.reshape(*up.shape, 1, 1))


def _frozen(x, weight, bias, conv):
    return F.linear(x, weight, bias) if conv is None else F.conv2d(x, weight, bias, **conv)


class _DoraLayer(torch.autograd.Function):
    """y = W(x ⊙ s) + b + up(mid(down(x ⊙ s))), keeping x, s and the factors for backward: x ⊙ s and the rank-sized
    intermediates are rebuilt there, so a DoRA layer keeps what a LoRA layer keeps (x is often shared: q/k/v)."""

    @staticmethod
    def forward(ctx, x, s, weight, bias, conv, down, mid, up):
        ctx.kind, ctx.conv = x.device.type, conv
        ctx.autocast = torch.is_autocast_enabled(ctx.kind)
        ctx.dtype = compute_dtype(x)
        xs = x * _per_channel(s, x, conv).to(x.dtype)
        ctx.save_for_backward(x, s, weight, down, mid, up)
        return _frozen(xs, weight, bias, conv) + _chain(xs, down, mid, up, conv)

    @staticmethod
    def backward(ctx, grad):
        x, s, weight, down, mid, up = ctx.saved_tensors
        conv, sv = ctx.conv, _per_channel(s, x, ctx.conv)
        factors = [None if t is None else t.detach().requires_grad_(need)
                   for t, need in zip((down, mid, up), ctx.needs_input_grad[5:])]
        with torch.enable_grad(), torch.autocast(ctx.kind, dtype=ctx.dtype, enabled=ctx.autocast):
            xs = (x.detach() * sv.to(x.dtype)).requires_grad_(True)
            out = _chain(xs, *factors, conv)
        wanted = [xs, *[t for t in factors if t is not None and t.requires_grad]]
        got = list(torch.autograd.grad(out, wanted, grad))
        g = grad.to(ctx.dtype)
        if conv is None:
            grad_xs = got[0] + g @ weight.to(ctx.dtype)
        else:
            grad_xs = got[0] + torch.ops.aten.convolution_backward(
                g, xs.detach().to(ctx.dtype), weight.to(ctx.dtype), None, conv["stride"], conv["padding"],
                conv["dilation"], False, [0, 0], 1, [True, False, False])[0]
        grad_x = (grad_xs * sv.to(grad_xs.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(x.dim()) if d != (1 if conv is not None else x.dim() - 1)]
            grad_s = (grad_xs.float() * x.float()).sum(dims)
        rest = iter(got[1:])
        factor_grads = [next(rest) if t is not None and t.requires_grad else None for t in factors]
        return (grad_x, grad_s, None, None, None, *factor_grads)


def _per_channel(s: torch.Tensor, x: torch.Tensor, conv) -> torch.Tensor:
    return s.view(-1, 1, 1) if conv is not None else s


class FastLoConModule(LoConModule):
    """LyCORIS's LoConModule (same parameters, file layout, init), forward without the full-size weight."""

    def _fast_ok(self) -> bool:
        return layer_supported(self) and not (self.wd and self.wd_on_out)

    def _down_flat(self) -> torch.Tensor:
        """The r × in·k·k matrix A with ΔW = up · A (the Tucker core folded in)."""
        down = self.lora_down.weight
        if self.tucker:
            mid = self.lora_mid.weight
            return torch.einsum("ijhw,jc->ichw", mid, down.flatten(1)).flatten(1)
        return down.flatten(1)

    def _up(self, x: torch.Tensor, coef: float) -> torch.Tensor:
        """up (out × r) times scale·scalar·coef, with the rank-dropout mask on its rows."""
        out = self.lora_up.weight.shape[0]
        up = self.lora_up.weight.reshape(out, -1) * (self.scalar.to(x.device) * (self.scale * coef))
        mask = row_mask(self, out, x.device, on_device=True)
        return up if mask is None else up * mask[:, None]

    def _factors(self, up: torch.Tensor):
        conv = conv_args(self.org_module[0]) if self.isconv else None
        mid = self.lora_mid.weight if self.tucker else None
        return conv, self.lora_down.weight, mid, up

    @torch.no_grad()
    def _weight_sq(self, w: torch.Tensor) -> torch.Tensor:
        """‖W_c‖² per input channel, in fp32. W is frozen: kept until the weight changes (its storage, version,
        dtype or device), outside the state dict; never for the memory trace's shape-only tensors."""
        from torch._subclasses.fake_tensor import FakeTensor

        def compute():  # a reduction, no full-size temporary: the first step's peak is the later steps' too
            flat = w.detach().reshape(w.shape[0], w.shape[1], -1)
            return torch.linalg.vector_norm(flat, dim=(0, 2), dtype=torch.float32) ** 2

        if w.is_meta or isinstance(w, FakeTensor):
            return compute()
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        cached = self.__dict__.get("_weight_sq_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight_sq_cache"] = (key, compute())
        return cached[1]

    def _dora_scale(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """s per input channel, from W and the factors (see the module docstring)."""
        w = self.org_module[0].weight
        out, cin = w.shape[0], w.shape[1]
        a = self._down_flat()
        w_sq = self._weight_sq(w)
        # ⟨W, up·A⟩ per column: the one out × in·k·k product, in W's dtype (autocast's, under autocast).
        cross_w = torch.matmul(up.t().to(w.dtype), w.detach().reshape(out, -1)).float()
        with torch.autocast(x.device.type, enabled=False):
            up32, a32 = up.float(), a.float()
            # 2·⟨W, up·A⟩ + ‖up·A‖² = Σ_k A ⊙ (2·upᵀW + upᵀup·A): one r × in·k·k tensor kept for backward, not two
            n2 = w_sq + (a32 * (2 * cross_w + (up32.t() @ up32) @ a32)).sum(0).view(cin, -1).sum(1)
            norm = n2.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps
            s = self.dora_scale.reshape(cin).float() / norm
            if self.multiplier != 1:
                s = self.multiplier * (s - 1) + 1
        return s

    def forward(self, x, *args, **kwargs):
        if not self._fast_ok():
            return super().forward(x, *args, **kwargs)
        if module_dropped(self):
            return self.org_forward(x, *args, **kwargs)
        layer = self.org_module[0]
        if self.wd:
            up = self._up(x, 1.0)
            return _DoraLayer.apply(x, self._dora_scale(x, up), layer.weight, layer.bias, *self._factors(up))
        base = self.org_forward(x, *args, **kwargs)
        conv, down, mid, up = self._factors(self._up(x, self.multiplier))
        return base + _chain(x, down, mid, up, conv)


__all__ = ["FastLoConModule"]
