"""Which modules to adapt (targets resolved on the real model before injection), and injecting the run's adapter
(`sdlora.adapters.spec.AdapterSpec`) into them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .layers import ADAPTER_PARTS
from .spec import AdapterSpec
from .targets import KNOWN_UNET_TARGETS, TEXT_ENCODER_TARGETS, UNET_SHORTHANDS
from ..config.train_config import ConfigError

# kohya's LoCon set ("conv_dim"): every ResnetBlock2D, Downsample2D and Upsample2D -- the 3x3 convs at the conv rank, a
# ResNet's time_emb_proj and 1x1 conv_shortcut at the network rank.
_CONV3X3 = re.compile(r".*(resnets\.\d+\.conv[12]|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$")
_RESNET_1X1 = re.compile(r".*resnets\.\d+\.(time_emb_proj|conv_shortcut)$")


@dataclass(frozen=True)
class TargetModule:
    name: str
    kind: str  # "linear" | "conv1x1" | "conv3x3"
    in_features: int
    out_features: int
    kernel: int  # 1 for linear / 1x1


def _describe(name: str, module: nn.Module) -> TargetModule | None:
    if isinstance(module, nn.Linear):
        return TargetModule(name, "linear", module.in_features, module.out_features, 1)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        k = module.kernel_size[0]
        kind = "conv1x1" if module.kernel_size == (1, 1) else "conv3x3"
        return TargetModule(name, kind, module.in_channels, module.out_channels, k)
    return None


def base_modules(model: nn.Module):
    """named_modules() without PEFT's own sub-layers, so targets resolve the same before and after injection."""
    for name, module in model.named_modules():
        if any(part in ADAPTER_PARTS for part in name.split(".")):
            continue
        if hasattr(module, "base_layer"):
            module = module.base_layer
        yield name, module


def resolve_unet_targets(unet: nn.Module, targets: list[str], *, conv_rank: int = 0) -> list[TargetModule]:
    """Expand shorthands and module names into the exact UNet modules to adapt; unknown names are an error."""
    candidates = [(n, d) for n, m in base_modules(unet) if (d := _describe(n, m)) is not None]
    chosen: dict[str, TargetModule] = {}
    for target in targets:
        if target in UNET_SHORTHANDS:
            pattern = re.compile(UNET_SHORTHANDS[target])
            hits = [d for n, d in candidates if pattern.fullmatch(n) and d.kind != "conv3x3"]
        else:
            hits = [d for n, d in candidates if (n == target or n.endswith("." + target)) and d.kind != "conv3x3"]
        if not hits:
            raise ConfigError(
                f"targets: '{target}' matches no Linear or 1x1 conv module of this UNet. Use "
                f"{', '.join(UNET_SHORTHANDS)} or module names such as {', '.join(KNOWN_UNET_TARGETS)}."
            )
        for d in hits:
            chosen[d.name] = d
    if conv_rank > 0:
        for n, d in candidates:
            if (d.kind == "conv3x3" and _CONV3X3.fullmatch(n)) or (d.kind != "conv3x3" and _RESNET_1X1.fullmatch(n)):
                chosen[n] = d
    return [chosen[n] for n in sorted(chosen)]


def resolve_text_encoder_targets(text_encoder: nn.Module) -> list[TargetModule]:
    found = []
    for name, module in base_modules(text_encoder):
        if name.split(".")[-1] in TEXT_ENCODER_TARGETS and (d := _describe(name, module)) is not None:
            found.append(d)
    return found


def check_rank_fits(modules: list[TargetModule], rank: int, conv_rank: int = 0, *, where: str = "UNet") -> None:
    """A LoRA on a layer with in x out weights can use at most min(in·k², out) ranks. A rank above that for every
    adapted layer can never be used anywhere (only memory is spent): refuse it, naming the largest rank that fits.
    (A rank that only exceeds some narrow layers is allowed: the wider ones use it.)"""
    for setting, value, kinds in (("rank", rank, ("linear", "conv1x1")), ("conv_rank", conv_rank, ("conv3x3",))):
        layers = [m for m in modules if m.kind in kinds]
        if not value or not layers:
            continue
        widest = max(layers, key=lambda m: min(m.in_features * m.kernel * m.kernel, m.out_features))
        limit = min(widest.in_features * widest.kernel * widest.kernel, widest.out_features)
        if value > limit:
            raise ConfigError(f"{setting}: {value} is larger than every {where} layer it adapts: the widest "
                              f"({widest.name}, {widest.in_features} -> {widest.out_features} features) can use at most "
                              f"rank {limit}. Choose {setting} {limit} or less.")


def inject_unet(unet: nn.Module, targets: list[str], spec: AdapterSpec) -> list[TargetModule]:
    modules = resolve_unet_targets(unet, targets, conv_rank=spec.conv_rank)
    check_rank_fits(modules, spec.rank, spec.conv_rank)
    spec.inject(unet, modules)
    return modules


def inject_text_encoder(text_encoder: nn.Module, spec: AdapterSpec) -> list[TargetModule]:
    modules = resolve_text_encoder_targets(text_encoder)
    if not modules:
        raise ConfigError("train_text_encoder: this text encoder has no q/k/v/out_proj or fc1/fc2 layers to adapt.")
    check_rank_fits(modules, spec.rank, where="text-encoder")
    spec.inject(text_encoder, modules)
    return modules
