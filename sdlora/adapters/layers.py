"""An adapted model, whatever the adapter type: its adapted layers, their tensors in the file layout, trainable
parameters, strength, and the state a checkpoint keeps. PEFT LoRA layers and LyCORIS layers answer the same questions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .lycoris_layer import LYCORIS_CHILD, LycorisLayer
from .spec import ADAPTER_NAME

# Names of the sub-modules an adapter adds; base_modules() skips them so targets resolve the same after injection.
ADAPTER_PARTS = ("lora_A", "lora_B", "base_layer", "lora_dropout", "lora_magnitude_vector", LYCORIS_CHILD)
# Parameters that play LoRA's "up"/B role, for LoRA+ (kohya's loraplus_lr_ratio).
_UP = ("lora_B", "lora_up")


def _peft_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path, layer) for every adapted layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LycorisLayer) or _peft_layer(module):
            yield name, module


def has_adapter(model: nn.Module | None) -> bool:
    return model is not None and next(adapted_layers(model), None) is not None


def has_peft_adapters(model: nn.Module | None) -> bool:
    """Whether PEFT adapters of any name (diffusers' loader adds its own) are injected into `model`."""
    return model is not None and bool(getattr(model, "peft_config", None))


@torch.no_grad()
def file_parts(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's tensors under the kohya/LyCORIS part names."""
    if isinstance(layer, LycorisLayer):
        return layer.file_parts()
    return {"lora_down.weight": layer.lora_A[ADAPTER_NAME].weight.detach(),
            "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight.detach(),
            "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER_NAME]))}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything the adapters train, in a fixed order."""
    out = []
    for path, layer in adapted_layers(model):
        for name, p in layer.named_parameters():
            if name.startswith("base_layer."):
                continue
            out.append((f"{path}.{name}", p))
    return out


def is_up_parameter(name: str) -> bool:
    return any(part in _UP for part in name.split("."))


def make_trainable_fp32(model: nn.Module) -> None:
    """Frozen base may be fp16/bf16; trainable adapter params stay fp32 so small updates are not rounded away."""
    for _, p in trainable_parameters(model):
        p.data = p.data.float()


def set_strength(model: nn.Module, strength: float) -> None:
    """Scale every adapter of the model: 0 = base model, 1 = as trained."""
    for _, layer in adapted_layers(model):
        if isinstance(layer, LycorisLayer):
            layer.set_strength(strength)
        else:
            for adapter in layer.scaling:
                layer.scaling[adapter] = strength * layer.lora_alpha[adapter] / layer.r[adapter]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of one component: its trainable adapter tensors. PEFT's part keeps PEFT's own keys, so
    checkpoints written before LyCORIS types existed still resume."""
    state: dict[str, torch.Tensor] = {}
    if getattr(model, "peft_config", None):
        from peft.utils import get_peft_model_state_dict

        state.update(get_peft_model_state_dict(model))
    for path, layer in adapted_layers(model):
        if isinstance(layer, LycorisLayer):
            state.update({f"{path}.{LYCORIS_CHILD}.{n}": p.detach() for n, p in layer.module.named_parameters()})
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    marker = f".{LYCORIS_CHILD}."
    peft_part = {k: v for k, v in state.items() if marker not in k}
    if peft_part:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(model, peft_part)
    own = adapter_state_dict(model)
    for name, value in state.items():
        if marker in name:
            own[name].copy_(value)
