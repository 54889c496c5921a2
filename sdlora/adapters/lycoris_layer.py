"""LoHa, LoKr and DoRA (and LoRA with rank/module dropout) through the `lycoris-lora` package, the reference
implementation of these algorithms, whose state dicts are the file layout ComfyUI and A1111 read.

PEFT has LoHa/LoKr/DoRA too, but not in that math: its DoRA magnitude is one number per *output* row, the files'
`dora_scale` one per *input* column, and its LoHa/LoKr scale and factorise differently. A renamed PEFT tensor would load
and compute something else, so these types train with LyCORIS's modules, wrapped the way PEFT wraps a layer
(`.base_layer` + the adapter), so the rest of sdlora sees one shape of adapted model. They train through sdlora's
subclasses of those modules (`lycoris_class`), whose forward computes the same layer without a full-size weight.
"""

from __future__ import annotations

import torch
from torch import nn

LYCORIS_CHILD = "lycoris"


class LycorisLayer(nn.Module):
    """A frozen layer with a LyCORIS module beside it. The module keeps an unregistered reference to the layer and
    adds its weight change to the layer's own forward."""

    def __init__(self, base_layer: nn.Module, module: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        setattr(self, LYCORIS_CHILD, module)

    def forward(self, x, *args, **kwargs):
        return getattr(self, LYCORIS_CHILD)(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # weight, in_features, kernel_size, ...: the wrapped layer's
            return getattr(super().__getattr__("base_layer"), name)

    @property
    def module(self) -> nn.Module:
        return getattr(self, LYCORIS_CHILD)

    def file_parts(self) -> dict[str, torch.Tensor]:
        """The module's tensors under the file's part names (lora_down.weight, hada_w1_a, lokr_w1, dora_scale, alpha)."""
        return {k: v.detach() for k, v in self.module.custom_state_dict().items()}

    def set_strength(self, strength: float) -> None:
        self.module.multiplier = float(strength)


def lycoris_class(network: str, *, reference: bool | None = None):
    """The module class that trains `network`: sdlora's fast subclasses of LyCORIS's modules (same parameters and
    file layout, a forward that never keeps a full-size weight; see fast_locon/fast_lokr/fast_loha), or LyCORIS's own
    with `reference=True` or SDLORA_REFERENCE_ADAPTERS=1. A layer a fast forward does not cover runs the reference one."""
    # Imported on first use: lycoris pulls in extra modules sdlora's other commands never need.
    from .fast_common import reference_forced

    if reference is None:
        reference = reference_forced()
    if network == "loha":
        if reference:
            from lycoris.modules.loha import LohaModule
            return LohaModule
        from .fast_loha import FastLohaModule
        return FastLohaModule
    if network == "lokr":
        if reference:
            from lycoris.modules.lokr import LokrModule
            return LokrModule
        from .fast_lokr import FastLokrModule
        return FastLokrModule
    if reference:
        from lycoris.modules.locon import LoConModule
        return LoConModule
    from .fast_locon import FastLoConModule
    return FastLoConModule


def wrap(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put a LycorisLayer where `path` is, keeping the original layer inside it."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    base_layer = getattr(parent, leaf)
    setattr(parent, leaf, LycorisLayer(base_layer, module))
