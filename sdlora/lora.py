"""Which modules to adapt, LoRA injection through PEFT, parameter counts and strength."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from .adapters.targets import KNOWN_UNET_TARGETS, TEXT_ENCODER_TARGETS, UNET_SHORTHANDS
from .config import ConfigError

ADAPTER_NAME = "default"

# ResNet 3x3 convs plus the resampling convs: kohya's LoCon ("conv_dim") set.
_CONV3X3 = re.compile(r".*(resnets\.\d+\.conv[12]|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$")


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
        if any(part in ("lora_A", "lora_B", "base_layer", "lora_dropout") for part in name.split(".")):
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
            if d.kind == "conv3x3" and _CONV3X3.fullmatch(n):
                chosen[n] = d
    return [chosen[n] for n in sorted(chosen)]


def resolve_text_encoder_targets(text_encoder: nn.Module) -> list[TargetModule]:
    found = []
    for name, module in base_modules(text_encoder):
        if name.split(".")[-1] in TEXT_ENCODER_TARGETS and (d := _describe(name, module)) is not None:
            found.append(d)
    return found


def count_lora_parameters(modules: list[TargetModule], rank: int, conv_rank: int = 0) -> int:
    total = 0
    for m in modules:
        r = conv_rank if m.kind == "conv3x3" else rank
        total += r * m.in_features * m.kernel * m.kernel + m.out_features * r
    return total


def _lora_config(modules: list[TargetModule], rank: int, alpha: float, conv_rank: int, conv_alpha: float, seedless_init: bool = True) -> LoraConfig:
    names = [m.name for m in modules]
    conv_names = [m.name for m in modules if m.kind == "conv3x3"]
    # PEFT matches *_pattern keys as regexes against the module path; anchor to the exact path.
    rank_pattern = {f"^{re.escape(n)}$": conv_rank for n in conv_names}
    alpha_pattern = {f"^{re.escape(n)}$": conv_alpha for n in conv_names}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros -> training starts exactly at the base model
        lora_dropout=0.0,
    )


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


def inject_unet_lora(unet: nn.Module, targets: list[str], rank: int, alpha: float, *, conv_rank: int = 0, conv_alpha: float = 1.0) -> list[TargetModule]:
    modules = resolve_unet_targets(unet, targets, conv_rank=conv_rank)
    check_rank_fits(modules, rank, conv_rank)
    unet.add_adapter(_lora_config(modules, rank, alpha, conv_rank, conv_alpha), adapter_name=ADAPTER_NAME)
    return modules


def inject_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float) -> list[TargetModule]:
    modules = resolve_text_encoder_targets(text_encoder)
    if not modules:
        raise ConfigError("train_text_encoder: this text encoder has no q/k/v/out_proj or fc1/fc2 layers to adapt.")
    check_rank_fits(modules, rank, where="text-encoder")
    text_encoder.add_adapter(_lora_config(modules, rank, alpha, 0, 1.0), adapter_name=ADAPTER_NAME)
    return modules


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def make_lora_params_fp32(model: nn.Module) -> None:
    """Frozen base may be fp16/bf16; trainable LoRA params stay fp32 so small updates are not rounded away."""
    for p in lora_parameters(model):
        p.data = p.data.float()


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the LoRA branch of an injected model: 0 = base model, 1 = as trained."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.scaling:
                module.scaling[adapter] = scale * module.lora_alpha[adapter] / module.r[adapter]


@torch.no_grad()
def lora_modules(model: nn.Module):
    """Yield (module path, lora_down weight, lora_up weight, rank, alpha) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            yield (
                name,
                module.lora_A[ADAPTER_NAME].weight,
                module.lora_B[ADAPTER_NAME].weight,
                module.r[ADAPTER_NAME],
                float(module.lora_alpha[ADAPTER_NAME]),
            )
