"""Training configuration: one validated TrainConfig, TOML presets, and the kohya_ss GUI import."""

from .train_config import ConfigError, TrainConfig, load_preset, make_config, save_preset

__all__ = ["ConfigError", "TrainConfig", "load_preset", "make_config", "save_preset"]
