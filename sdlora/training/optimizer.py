"""The optimizer over the adapter parameters (AdamW, 8-bit AdamW or Prodigy), with LoRA+ parameter groups."""

from __future__ import annotations

import torch

from ..adapters.layers import is_up_parameter, trainable_parameters
from ..config.train_config import ConfigError, TrainConfig
from .errors import TrainingError


def make_optimizer(config: TrainConfig, groups: list[dict]):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optimizer 'adamw8bit' needs bitsandbytes: pip install -r requirements.txt, or use --optimizer adamw.") from None
        return bnb.optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"optimizer: unknown optimizer '{config.optimizer}' (use adamw, adamw8bit or prodigy).")


def param_groups(module, lr: float, loraplus_ratio: float | None) -> list[dict]:
    """The module's adapter parameters as optimizer groups. LoRA+ (kohya's loraplus_lr_ratio): the up/B matrices get their
    own group at lr x ratio."""
    named = trainable_parameters(module)
    if not loraplus_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    up = [p for n, p in named if is_up_parameter(n)]
    down = [p for n, p in named if not is_up_parameter(n)]
    return [{"params": down, "lr": lr}, {"params": up, "lr": lr * loraplus_ratio}]
