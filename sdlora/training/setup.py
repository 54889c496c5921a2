"""Everything before the first step, as named steps that `Trainer.prepare()` runs in order: data, accelerate, the
base model, adapter injection, where each part lives (and the memory check), the caches, the optimizer, resume.

`run` is the Trainer being prepared; each step sets the attributes the later ones and the loop read.
"""

from __future__ import annotations

import torch

from ..adapters.inject import inject_text_encoder, inject_unet
from ..adapters.layers import make_trainable_fp32
from ..adapters.spec import AdapterSpec
from ..config.train_config import ConfigError
from ..data.caches import LatentCache, TextEmbeddingCache
from ..inference.sampling import parse_prompt_line
from .errors import TrainingError
from .events import StatusEvent, WarningEvent
from .noise import check_objective, training_scheduler
from .optimizer import make_optimizer, param_groups
from .resume import apply_checkpoint, choose_checkpoint
from .saving import adapted_modules


def load_data(run) -> None:
    """Cheap checks first: every folder and the dataset TOML are read here, so a bad path fails before any model loads."""
    from ..data.plan import build_training_data
    from ..models import resolve_model_spec

    cfg = run.config
    run.data = build_training_data(cfg)
    run.report = run.data.reports[0][1]
    run.data_dir = run.report.root
    run.dataset = run.data.dataset
    run.shuffles_captions = any(s.shuffle_tags or s.tag_dropout > 0 for s in run.dataset.subsets)  # per-step variants
    if run.given_base is None:
        resolve_model_spec(cfg.base_model)
    run.sample_prompts = [parse_prompt_line(p) for p in cfg.all_sample_prompts()]
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; on CPU use 'bf16' or 'no'.")


def start_accelerator(run) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    cfg = run.config
    # accelerate keeps one process-wide state that refuses a second precision; the web UI trains many runs in one
    # process, so each run starts a fresh one (the process group, if launched distributed, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    trackers = {}
    if cfg.log_with == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ConfigError("log_with: tensorboard needs the tensorboardX (or tensorboard) package: "
                              "pip install tensorboardX, or set log_with to none.")
        trackers = {"log_with": "tensorboard", "project_dir": str(run.out_dir / "logs")}  # events: logs/tensorboard
    run.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1, **trackers)
    run.emit(StatusEvent, message=run.data.summary())
    set_seed(cfg.seed)
    run.device = run.accelerator.device
    run.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def load_model(run) -> None:
    from ..models import load_base_model

    cfg = run.config
    run.emit(StatusEvent, message=f"Loading base model {cfg.base_model} ...")
    pred = None if cfg.prediction_type == "auto" else cfg.prediction_type
    run.base = run.given_base or load_base_model(cfg.base_model, allow_pickle=cfg.allow_pickle, prediction_type=pred)
    run.family = run.base.family
    run.te_names = list(run.family.text_encoder_names)
    for module in (run.base.unet, run.base.vae, *run.base.text_encoders):
        module.requires_grad_(False)
    run.prediction_type = run.base.prediction_type
    check_objective(run)
    run.noise_scheduler = training_scheduler(run.base.noise_scheduler, zero_terminal_snr=cfg.zero_terminal_snr)


def inject_adapters(run) -> int:
    """Add the adapter layers to the UNet and each text encoder that trains; returns the trainable parameter count."""
    from accelerate.utils import set_seed

    from ..models import MODEL_LOCK

    cfg, base = run.config, run.base
    te_lrs = cfg.text_encoder_lrs(len(run.te_names))
    # Seed right before injection: LoRA init must not depend on what loading the model consumed.
    set_seed(cfg.seed)
    run.adapter = AdapterSpec.from_config(cfg)
    with MODEL_LOCK:  # new LoRA layers are modules too: not while another thread is loading a model
        run.unet_modules = inject_unet(base.unet, cfg.targets, run.adapter)
        # A text encoder whose LR is 0 stays frozen (kohya's way of training one SDXL encoder only).
        run.trained_te = [i for i in range(len(run.te_names)) if cfg.train_text_encoder and te_lrs[i] > 0]
        run.te_modules = {run.te_names[i]: inject_text_encoder(base.text_encoders[i], run.adapter) for i in run.trained_te}
    n_te_modules = sum(len(m) for m in run.te_modules.values())
    n_params = run.adapter.parameter_count(run.unet_modules) + sum(
        run.adapter.parameter_count(m) for m in run.te_modules.values())
    run.emit(StatusEvent, message=f"{run.family.label} model; {run.adapter.label} on {len(run.unet_modules)} UNet and "
             f"{n_te_modules} text-encoder modules: {n_params:,} trainable parameters")
    return n_params


def choose_residency(run) -> None:
    """Once latents and captions are cached, the VAE encoder and a frozen text encoder are idle. An owned model drops
    them (previews use cached prompt embeddings and the VAE decoder); on CUDA what is kept leaves the GPU until
    previews bring it back."""
    cfg = run.config
    keeps_moving = run.device.type == "cuda" or run.owns_base
    run.vae_leaves_device = cfg.cache_latents and keeps_moving
    run.te_leaves_device = not run.trained_te and not run.shuffles_captions and keeps_moving


def check_memory(run, n_params: int) -> None:
    from .memory import estimate_training_memory

    try:
        est = estimate_training_memory(family=run.family, unet=run.base.unet, text_encoders=run.base.text_encoders,
                                       vae=run.base.vae, lora_params=n_params, config=run.config, device=run.device,
                                       trained_text_encoders=run.trained_te, vae_on_device=not run.vae_leaves_device,
                                       text_encoders_on_device=not run.te_leaves_device)
    except Exception as exc:  # an estimate must never stop a run
        run.memory_estimate = None
        run.emit(StatusEvent, message=f"No memory estimate for this model ({type(exc).__name__}: {exc}).")
        return
    run.memory_estimate = est
    if est.fits():
        run.emit(StatusEvent, message=est.describe())
    else:
        run.emit(WarningEvent, message=est.describe() + ". This may not fit: lower batch_size or resolution, turn on "
                 "gradient_checkpointing, use bf16/fp16 mixed precision or the adamw8bit optimizer.")


def place_modules(run) -> None:
    """Frozen weights in the compute dtype, LoRA weights in fp32; the VAE stays fp32 (fp16 VAEs overflow to NaN)."""
    cfg, base, device = run.config, run.base, run.device
    base.unet.to(device, dtype=run.weight_dtype)
    for i, te in enumerate(base.text_encoders):
        te.to(device, dtype=torch.float32 if i in run.trained_te else run.weight_dtype)
        make_trainable_fp32(te)
    base.vae.to(device, dtype=torch.float32)
    make_trainable_fp32(base.unet)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for i in run.trained_te:
            base.text_encoders[i].activation_checkpointing_enable()
    if device.type == "cuda":
        base.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        base.unet.compile()  # in place: the module (and its LoRA parameters) stay the same objects


def plan_steps(run) -> None:
    from ..data.plan import make_step_plan

    cfg = run.config

    def on_unreadable(path, reason: str, stand_in) -> None:
        # An image that loaded at the scan fails now (deleted, truncated, undecodable): said once, then skipped.
        instead = f"; its samples use {stand_in.name} instead" if stand_in is not None else ""
        run.emit(WarningEvent, message=f"Image {path} cannot be read any more ({reason}): skipped for the rest of the run{instead}.")

    run.dataset.on_unreadable = on_unreadable
    if cfg.cache_latents and any(s.random_crop for s in run.dataset.subsets):
        run.emit(WarningEvent, message="Random crop is off while latents are cached (each image is encoded once, centre-cropped). Set cache_latents = false for random crops.")
    run.plan = make_step_plan(cfg, run.dataset, run.accelerator.num_processes)
    run.total_steps, run.steps_per_epoch = run.plan.total_steps, run.plan.steps_per_epoch


def cache_latents(run) -> None:
    run.latents = None
    if not run.config.cache_latents:
        return
    base, acc = run.base, run.accelerator
    run.emit(StatusEvent, message="Caching latents ...")
    run.latents = LatentCache(base.vae, vae_id=f"{base.model_hash}:vae",
                              cache_dir=run.out_dir / "cache" / "latents" if acc.is_main_process else None, device=run.device)
    run.latents.build(run.dataset, flips=(False, True) if run.dataset.any_flip else (False,))
    if run.vae_leaves_device:
        if run.owns_base:
            base.vae.encoder = base.vae.quant_conv = None  # only decoding is left to do
        base.vae.to("cpu")


def cache_text(run) -> None:
    base, ds = run.base, run.dataset
    run.text_cache = TextEmbeddingCache(run.family, base.tokenizers, base.text_encoders, run.device,
                                        clip_skip=run.config.clip_skip)
    if run.trained_te or run.shuffles_captions:
        return
    # Every caption the run can see is known now (fixed, or "" under dropout), and so are the preview prompts:
    # encode them once.
    captions = {ds.fixed_caption(i) for i in range(len(ds.items))} | {""}
    captions |= set(run.val_captions)
    captions |= {p.prompt for p in run.sample_prompts} | {p.negative for p in run.sample_prompts}
    captions = sorted(captions)
    for start in range(0, len(captions), 16):
        run.text_cache.get(captions[start: start + 16])
    if run.te_leaves_device:
        if run.owns_base:
            base.text_encoders = run.text_cache.text_encoders = [None] * len(base.text_encoders)
        else:
            for te in base.text_encoders:
                te.to("cpu")


def build_optimizer(run) -> None:
    """Optimizer and LR schedule over the adapter parameters, and the trained modules through accelerate.prepare."""
    from diffusers.optimization import get_scheduler

    cfg, base = run.config, run.base
    te_lrs = cfg.text_encoder_lrs(len(run.te_names))
    groups = param_groups(base.unet, cfg.lr, cfg.loraplus_lr_ratio)
    for i in run.trained_te:
        groups += param_groups(base.text_encoders[i], te_lrs[i], cfg.loraplus_lr_ratio)
    run.trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(cfg, groups)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=run.total_steps)
    trained = [base.unet] + [base.text_encoders[i] for i in run.trained_te]
    *prepared, run.optimizer, run.scheduler = run.accelerator.prepare(*trained, optimizer, scheduler)
    run.unet = prepared[0]
    # What the loop calls: the prepared (DDP-wrapped) modules for trained encoders, the plain ones otherwise.
    run.text_encoders = list(base.text_encoders)
    for i, module in zip(run.trained_te, prepared[1:]):
        run.text_encoders[i] = module
    if run.trained_te:  # captions are encoded every step through the modules that train
        run.text_cache.text_encoders = run.text_encoders


def resume(run) -> None:
    """Checked before use (see sdlora.training.resume): 'latest' falls back past damaged checkpoints, saying so."""
    run.start_step = 0
    if not run.config.resume:
        return
    modules = adapted_modules(run)
    ckpt = choose_checkpoint(run.config.resume, run.out_dir, modules=modules, optimizer=run.optimizer)
    for path, why in ckpt.skipped:
        run.emit(WarningEvent, message=f"Checkpoint {path} is damaged or does not fit this run ({why}); it was skipped.")
    if ckpt.step > run.total_steps:
        raise TrainingError(f"resume: checkpoint '{ckpt.path}' is at step {ckpt.step}, past this run's {run.total_steps} "
                            f"steps. Set steps above {ckpt.step}, or resume from an earlier checkpoint.")
    apply_checkpoint(ckpt, modules=modules, optimizer=run.optimizer, scheduler=run.scheduler)
    run.start_step = ckpt.step
    run.emit(StatusEvent, message=f"Resumed from {ckpt.path} at step {run.start_step}")
