"""Training settings from a client, made into a TrainConfig the server will run: the output folder always under the
output root, every path and dangerous switch checked against the access policy, and the cheap checks that need the
disk done before a job is queued."""

from __future__ import annotations

from typing import Any

from ...config.train_config import ConfigError, TrainConfig, make_config
from ...paths import DEMO_DATA, resolve_data_dir
from ..access import AccessPolicy, resolved
from .datasets import DatasetService
from .inputs import sanitize_name
from .model_cache import ModelCache


class ConfigService:
    def __init__(self, access: AccessPolicy, datasets: DatasetService, models: ModelCache):
        self.access = access
        self.datasets = datasets
        self.models = models

    def build(self, values: dict[str, Any]) -> TrainConfig:
        """A validated TrainConfig whose output folder is always under the output root."""
        values = dict(values)
        values["output_name"] = sanitize_name(values.get("output_name") or "lora")
        values["output_dir"] = str(self.access.output_root / values["output_name"])
        return make_config(**values)

    def checked(self, values: dict[str, Any]) -> TrainConfig:
        """build plus the access policy (every path in it, allow_pickle) and the cheap checks that need the disk:
        the base model resolves, the prompts parse, the dataset folder exists."""
        from ...inference.sampling import parse_prompt_line
        from ...models import resolve_model_spec

        cfg = self.build(values)
        self.check_access(cfg)
        if not cfg.data_dir.strip() and not cfg.dataset_config.strip():
            raise ConfigError(f"data_dir: choose a dataset folder on the Dataset tab (or {DEMO_DATA}), or a kohya dataset "
                              "config.")
        root = self.datasets.root(cfg.data_dir) if cfg.data_dir.strip() else None
        resolve_model_spec(cfg.base_model)
        for line in cfg.all_sample_prompts():
            try:
                parse_prompt_line(line)
            except ValueError as exc:
                raise ConfigError(f"sample_prompts: {exc}") from None
        if root is not None and not root.is_dir():
            raise ConfigError(f"data_dir: '{cfg.data_dir}' is not a folder. Fix the path on the Dataset tab.")
        return cfg

    def check_access(self, cfg: TrainConfig) -> None:
        """Every path and dangerous switch in a config a client sent, against the access policy."""
        self.access.base_model(cfg.base_model, cfg.allow_pickle)
        self.access.resume(cfg.resume)
        if cfg.sample_prompts_file.strip():
            self.access.prompt_file(cfg.sample_prompts_file)
        if cfg.data_dir.strip():
            self.datasets.root(cfg.data_dir)
        if cfg.reg_data_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.reg_data_dir), cfg.reg_data_dir, what="reg_data_dir")
        if cfg.validation_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.validation_dir), cfg.validation_dir, what="validation_dir")
        if cfg.mask_dir.strip():
            self.access.dataset_folder(resolve_data_dir(cfg.mask_dir), cfg.mask_dir, what="mask_dir")
        if cfg.dataset_config.strip():
            # The TOML itself, then every image folder it names: a client must not reach other folders through it.
            from ...data.dataset_config import load_dataset_config

            self.access.prompt_file(cfg.dataset_config, what="dataset_config")
            for dataset in load_dataset_config(resolved(cfg.dataset_config)).datasets:
                for subset in dataset.subsets:
                    self.access.dataset_folder(subset.image_dir, str(subset.image_dir),
                                               what=f"dataset_config ({subset.where or 'image_dir'})")

    def preview_run(self, values: dict[str, Any]) -> str:
        """Before pressing Start: the step plan (images x repeats / batch / accumulation = steps) and the memory the
        run will need on this server's device, from the same code the run uses (no model is trained or changed)."""
        import torch

        from ...adapters.inject import resolve_text_encoder_targets, resolve_unet_targets
        from ...adapters.spec import AdapterSpec
        from ...data.plan import build_training_data, make_step_plan
        from ...training.memory import estimate_training_memory

        cfg = self.checked(values)
        data = build_training_data(cfg)
        lines = [make_step_plan(cfg, data.dataset).describe()]
        with self.models.lock:
            base = self.models.base_model(cfg.base_model, allow_pickle=cfg.allow_pickle)
            unet_mods = resolve_unet_targets(base.unet, cfg.targets, conv_rank=cfg.conv_rank)
            lrs = cfg.text_encoder_lrs(len(base.text_encoders))
            trained = [i for i, lr in enumerate(lrs) if cfg.train_text_encoder and lr > 0]
            adapter = AdapterSpec.from_config(cfg)
            n = adapter.parameter_count(unet_mods) + sum(
                adapter.parameter_count(resolve_text_encoder_targets(base.text_encoders[i])) for i in trained)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            # As the run does: cached latents send the VAE away, cached captions the frozen text encoders.
            est = estimate_training_memory(
                family=base.family, unet=base.unet, text_encoders=base.text_encoders, vae=base.vae, lora_params=n,
                config=cfg, device=device, trained_text_encoders=trained, vae_on_device=not cfg.cache_latents,
                text_encoders_on_device=bool(trained) or cfg.shuffle_tags)
        lines.append(f"{base.family.label} model; {n:,} trainable parameters. Memory: {est.describe()}"
                     + ("" if est.fits() else " — this may not fit: lower batch size or resolution, turn on gradient "
                        "checkpointing, bf16, or the adamw8bit optimizer."))
        return "\n\n".join(lines)
