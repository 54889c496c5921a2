"""LoKr without building kron(w1, w2).

LyCORIS's ΔW = scale · kron(w1, w2) has ΔW[(i, j), (p, q), ...] = scale · w1[i, p] · w2[j, q, ...] with w1 a × c and
w2 b × d (× the kernel window for a conv). Splitting the input's features (channels) into c groups of d:

  Linear  y = scale · vec_rows(w1 · (X · w2ᵀ)),  X = x reshaped (..., c, d)
  Conv2d  y = scale · w1 contracted with conv(x reshaped (n·c, d, H, W), w2) over the c groups

so the layer costs two small products instead of an out × in weight: the w2 half runs on the input's d-sized groups
(1/c of the full layer's work), w1 mixes the c groups. w2 may be a full matrix/kernel, a low-rank pair (w2_a · w2_b,
the kernel window in w2_b for a conv) or a Tucker core (1×1 → k×k → 1×1 convs); w1 full or a pair. Rank dropout masks
ΔW's rows as the reference does (an output-channel mask), strength multiplies, module dropout skips the layer. Only
the input and the factors are kept for backward, which runs the two small products again.

Falls back to the reference forward for DoKr (weight_decompose) and for layers `layer_supported` rejects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.lokr import LokrModule

from .fast_common import conv_args, layer_supported, module_dropped, per_out_channel, recomputed, row_mask


class FastLokrModule(LokrModule):
    """LyCORIS's LokrModule (same parameters, file layout, init), forward without the Kronecker product."""

    def _fast_ok(self) -> bool:
        return layer_supported(self) and not self.wd

    def _factors(self) -> list[torch.Tensor]:
        """The tensors ΔW is made of, in the order `_delta` unpacks them."""
        w1 = [self.lokr_w1] if self.use_w1 else [self.lokr_w1_a, self.lokr_w1_b]
        w2 = [self.lokr_w2] if self.use_w2 else [self.lokr_w2_a, self.lokr_w2_b]
        if not self.use_w2 and self.tucker:
            w2.append(self.lokr_t2)
        return [*w1, *w2, self.scalar]

    def _w2_linear(self, xg: torch.Tensor, w2: list) -> torch.Tensor:
        if self.use_w2:
            return F.linear(xg, w2[0])
        return F.linear(F.linear(xg, w2[1]), w2[0])

    def _w2_conv(self, xg: torch.Tensor, w2: list) -> torch.Tensor:
        kw = conv_args(self.org_module[0])
        if self.use_w2:
            return F.conv2d(xg, w2[0], **kw)
        a, b = w2[0], w2[1]
        if self.tucker:  # W2[p, q] = Σ t[i, j] · w2_a[i, p] · w2_b[j, q]: 1×1 (w2_b), k×k (t), 1×1 (w2_aᵀ)
            h = F.conv2d(xg, b[:, :, None, None])
            h = F.conv2d(h, w2[2], **kw)
            return F.conv2d(h, a.t()[:, :, None, None])
        h = F.conv2d(xg, b.reshape(b.shape[0], xg.shape[1], *self.shape[2:]), **kw)
        return F.conv2d(h, a[:, :, None, None])

    def _delta(self, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        *factors, scalar = factors
        w1 = factors[0] if self.use_w1 else factors[0] @ factors[1]
        w1 = w1 * (scalar * (self.scale * self.multiplier))
        w2 = factors[1:] if self.use_w1 else factors[2:]
        a, c = w1.shape
        if self.module_type == "linear":
            z = self._w2_linear(x.reshape(*x.shape[:-1], c, -1), w2)  # (..., c, b)
            y = torch.einsum("ip,...pj->...ij", w1, z)  # (..., a, b); einsum: one GEMM, not a batch of tiny ones
            return y.reshape(*x.shape[:-1], -1)
        n = x.shape[0]
        z = self._w2_conv(x.reshape(n * c, -1, *x.shape[2:]), w2)  # (n·c, b, H', W')
        y = torch.einsum("ip,npk->nik", w1, z.reshape(n, c, -1))  # (n, a, b·H'·W')
        return y.reshape(n, -1, *z.shape[2:])

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self._fast_ok():
            return super().forward(x, *args, **kwargs)
        if module_dropped(self):
            return self.org_forward(x, *args, **kwargs)
        base = self.org_forward(x, *args, **kwargs)
        # The (tokens × out)-sized intermediates are rebuilt in backward (1/c of the layer's work), not kept.
        delta = recomputed(self._delta, x, *self._factors())
        mask = row_mask(self, self.shape[0], x.device, on_device=False)
        if mask is not None:
            delta = per_out_channel(delta, mask, self.module_type != "linear")
        return base + delta


__all__ = ["FastLokrModule"]
