"""Max-norm regularisation of the LoRA layers (kohya's scale_weight_norms): after each optimizer step, a layer whose
update (up x down x scale) has a norm above the limit gets its up and down matrices scaled by the square root of
limit/norm each, so the update's norm comes down to the limit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.layers import adapted_layers
from ..adapters.spec import ADAPTER_NAME


@dataclass(frozen=True)
class NormStats:
    keys_scaled: int      # layers scaled down this step
    average_norm: float   # mean update norm over the layers, after scaling
    max_norm: float       # largest update norm, after scaling

    def log_fields(self) -> dict:
        return {"keys_scaled": self.keys_scaled, "average_key_norm": self.average_norm, "max_key_norm": self.max_norm}


def _up_down(layer) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    if lora_a is None or ADAPTER_NAME not in lora_a:
        return None
    return lora_b[ADAPTER_NAME].weight, lora_a[ADAPTER_NAME].weight, float(layer.scaling[ADAPTER_NAME])


@torch.no_grad()
def apply_max_norm(modules, max_norm: float) -> NormStats:
    """Clamp the update norm of every LoRA layer in `modules` (nn.Modules) to `max_norm`, in place."""
    scaled, norms = 0, []
    for model in modules:
        for _, layer in adapted_layers(model):
            found = _up_down(layer)
            if found is None:
                continue
            up, down, scale = found
            # The same Frobenius norm for linear and conv layers: up (out x r[x1x1]) times down (r x in[xkxk]).
            update = (up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()) * scale
            norm = update.norm().clamp(min=max_norm / 2)
            ratio = (torch.clamp(norm, max=max_norm) / norm).item()
            if ratio != 1:
                scaled += 1
                up.mul_(ratio ** 0.5)
                down.mul_(ratio ** 0.5)
            norms.append(update.norm().item() * ratio)
    if not norms:
        return NormStats(0, 0.0, 0.0)
    return NormStats(scaled, sum(norms) / len(norms), max(norms))
