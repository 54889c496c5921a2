"""Which adapter settings go together: the adapter types, what needs LyCORIS, and the combinations a run refuses.
Pure Python (no torch), so validating a config stays light; `TrainConfig` and `AdapterSpec` both ask here."""

from __future__ import annotations

from typing import Literal, get_args

Network = Literal["lora", "locon", "loha", "lokr"]
NETWORKS: tuple[str, ...] = get_args(Network)
# Hadamard / Kronecker products: no LoRA up/down pair, no dropout inside the adapter.
_PRODUCT_NETWORKS = ("loha", "lokr")


def is_product(network: str) -> bool:
    return network in _PRODUCT_NETWORKS


def needs_conv_layers(network: str) -> bool:
    """locon exists to adapt the ResNet blocks' convs: without a conv rank it is plain LoRA."""
    return network == "locon"


def needs_lycoris(settings) -> bool:
    """Whether these settings (a TrainConfig or AdapterSpec) train through LyCORIS's modules rather than PEFT's LoRA."""
    return bool(is_product(settings.network) or settings.dora or settings.tucker
                or settings.rank_dropout > 0 or settings.module_dropout > 0)


def check_adapter_settings(cfg) -> None:
    """Refuse adapter settings that cannot work together, with a sentence naming the fields (raises ValueError)."""
    if needs_conv_layers(cfg.network) and not cfg.conv_rank:
        raise ValueError("network locon adapts the ResNet blocks' convs: set conv_rank (e.g. 8, with conv_alpha 4), "
                         "or choose network lora")
    if cfg.loraplus_lr_ratio and is_product(cfg.network):
        raise ValueError(f"loraplus_lr_ratio works on LoRA's up/down pairs; {cfg.network} has none: remove it or "
                         "choose network lora/locon")
    if cfg.dropout and is_product(cfg.network):
        raise ValueError(f"dropout: {cfg.network} has no dropout inside the adapter; use rank_dropout or "
                         "module_dropout instead")
    if cfg.format == "diffusers" and needs_lycoris(cfg):
        raise ValueError("format diffusers holds plain LoRA only; LoHa, LoKr, DoRA, Tucker and rank/module dropout "
                         "runs export in the kohya/LyCORIS format that ComfyUI and A1111 read: set format = kohya")
