"""The memory estimate: the meta-device trace of a step against the same step run for real on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlora.config.train_config import make_config
from sdlora.adapters.layers import make_trainable_fp32
from sdlora.adapters.spec import AdapterSpec
from sdlora.adapters.inject import inject_text_encoder, inject_unet
from sdlora.training.memory import LiveTensorBytes, estimate_training_memory, trace_step_bytes
from sdlora.models import load_base_model


def _cfg(**over):
    values = dict(base_model="builtin:tiny", data_dir="x", rank=4, alpha=4.0, targets=["transformer"], resolution=64,
                  batch_size=2, steps=10)
    values.update(over)
    return make_config(**values)


def _dtype(cfg):
    return {"bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def _real_step_bytes(cfg, res: int, spec: str = "builtin:tiny") -> int:
    """One real training step on the CPU (frozen weights in the compute dtype, LoRA fp32, autocast), counted by the
    same live-bytes counter, through the family's own encode and UNet call."""
    from sdlora.families import SampleGeometry

    base = load_base_model(spec)
    family, unet, encoders = base.family, base.unet, base.text_encoders
    for m in (unet, *encoders):
        m.requires_grad_(False)
    spec = AdapterSpec.from_config(cfg)
    inject_unet(unet, cfg.targets, spec)
    if cfg.train_text_encoder:
        for te in encoders:
            inject_text_encoder(te, spec)
    unet.to(dtype=_dtype(cfg))
    make_trainable_fp32(unet)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for te in encoders:
                te.activation_checkpointing_enable()
    unet.train()
    for te in encoders:
        te.train()
    b = cfg.batch_size
    latents = torch.randn(b, 4, res // 8, res // 8, dtype=_dtype(cfg))
    t = torch.randint(0, 1000, (b,))
    ids = family.tokenize(base.tokenizers, ["a photo of a thing"] * b)
    geometry = [SampleGeometry((res, res), (0, 0), (res, res))] * b
    with torch.no_grad():
        frozen = family.conditioning(family.encode_tokens(encoders, ids), geometry).to(dtype=_dtype(cfg))
    weights = [x for m in (unet, *encoders) for x in (*m.parameters(), *m.buffers())]
    inputs = [x for x in (frozen.hidden, frozen.pooled, frozen.time_ids) if x is not None]
    counter = LiveTensorBytes(*weights, latents, t, *ids, *inputs)
    with counter:
        with torch.autocast("cpu", dtype=_dtype(cfg), enabled=cfg.mixed_precision != "no"):
            cond = family.conditioning(family.encode_tokens(encoders, ids), geometry) if cfg.train_text_encoder else frozen
            pred = family.unet_forward(unet, latents, t, cond)
        loss = F.mse_loss(pred.float(), torch.zeros_like(pred))
        loss.backward()
        del pred, loss, cond
    return counter.peak


@pytest.mark.parametrize("over", [
    {},
    {"gradient_checkpointing": True},
    {"batch_size": 1, "resolution": 128, "conv_rank": 2},
    {"train_text_encoder": True},
    {"mixed_precision": "bf16"},
    {"mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 1},
    {"network": "loha", "conv_rank": 2},
    {"network": "lokr", "lokr_factor": 4},
    {"dora": True, "conv_rank": 2},
], ids=["plain", "checkpointing", "conv-128px", "text-encoder", "bf16", "bf16-checkpointing", "loha", "lokr", "dora"])
def test_trace_matches_a_real_cpu_step(over):
    cfg = _cfg(**over)
    base = load_base_model("builtin:tiny")
    traced = trace_step_bytes(base.unet, family=base.family, config=cfg, compute_dtype=_dtype(cfg), height=cfg.resolution,
                              width=cfg.resolution,
                              trained_text_encoders={"text_encoder": base.text_encoder} if cfg.train_text_encoder else None)
    real = _real_step_bytes(cfg, cfg.resolution)
    assert real > 0
    assert abs(traced - real) <= 0.05 * real, (traced, real)


@pytest.mark.parametrize("over", [{}, {"train_text_encoder": True, "gradient_checkpointing": True},
                                  {"mixed_precision": "bf16"}], ids=["plain", "both-text-encoders", "bf16"])
def test_trace_matches_a_real_cpu_step_sdxl(over):
    """SDXL: pooled embedding and size conditioning in the step, both text encoders when they train."""
    cfg = _cfg(**over)
    base = load_base_model("builtin:tiny-xl")
    trained = dict(zip(base.family.text_encoder_names, base.text_encoders)) if cfg.train_text_encoder else None
    traced = trace_step_bytes(base.unet, family=base.family, config=cfg, compute_dtype=_dtype(cfg), height=cfg.resolution,
                              width=cfg.resolution, trained_text_encoders=trained)
    real = _real_step_bytes(cfg, cfg.resolution, "builtin:tiny-xl")
    assert real > 0
    assert abs(traced - real) <= 0.05 * real, (traced, real)


def test_trace_scales_with_batch_and_resolution_and_checkpointing_saves():
    base = load_base_model("builtin:tiny")

    def traced(**over):
        cfg = _cfg(**over)
        return trace_step_bytes(base.unet, family=base.family, config=cfg, compute_dtype=torch.float32, height=cfg.resolution, width=cfg.resolution)

    one, two = traced(batch_size=1), traced(batch_size=2)
    assert 1.7 * one < two < 2.3 * one
    assert traced(batch_size=1, resolution=128) > 3 * one
    assert traced(batch_size=1, gradient_checkpointing=True) < 0.8 * one
    bf16 = _cfg(batch_size=1)
    assert trace_step_bytes(base.unet, family=base.family, config=bf16, compute_dtype=torch.bfloat16, height=64, width=64) < 0.7 * one


def test_trace_leaves_the_real_model_alone():
    base = load_base_model("builtin:tiny")
    before = {n: p.clone() for n, p in base.unet.named_parameters()}
    trace_step_bytes(base.unet, family=base.family, config=_cfg(), compute_dtype=torch.float32, height=64, width=64)
    after = dict(base.unet.named_parameters())
    assert before.keys() == after.keys()  # no LoRA added to the real UNet
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_estimate_counts_what_stays_on_the_device(monkeypatch):
    import sdlora.training.memory as memory

    base = load_base_model("builtin:tiny")
    cfg = _cfg(optimizer="adamw")
    kwargs = dict(family=base.family, unet=base.unet, text_encoders=base.text_encoders, vae=base.vae, lora_params=1000,
                  config=cfg, device=torch.device("cpu"), trained_text_encoders=[])
    everything = estimate_training_memory(**kwargs, vae_on_device=True, text_encoders_on_device=True)
    cached = estimate_training_memory(**kwargs, vae_on_device=False, text_encoders_on_device=False)
    vae_bytes = sum(p.numel() for p in base.vae.parameters()) * 4
    te_bytes = sum(p.numel() for p in base.text_encoder.parameters()) * 4
    assert everything.weights - cached.weights == vae_bytes + te_bytes
    assert everything.trainable == 1000 * 16
    eight_bit = estimate_training_memory(**{**kwargs, "config": _cfg(optimizer="adamw8bit")}, vae_on_device=False)
    assert eight_bit.trainable == 1000 * 10

    # On the CPU the loaded weights are already in RAM: only the rest must fit in what is still available.
    assert cached.resident == cached.weights
    to_come = cached.total - cached.resident
    monkeypatch.setattr(memory, "available_memory", lambda device: int(to_come / 0.9) + 1)
    assert estimate_training_memory(**kwargs, vae_on_device=False, text_encoders_on_device=False).fits()
    monkeypatch.setattr(memory, "available_memory", lambda device: to_come)
    tight = estimate_training_memory(**kwargs, vae_on_device=False, text_encoders_on_device=False)
    assert not tight.fits()
    assert " available besides the " in tight.describe() and "MiB" in tight.describe()
    on_meta = estimate_training_memory(**{**kwargs, "device": torch.device("meta")}, vae_on_device=False,
                                       text_encoders_on_device=False)
    assert on_meta.resident == 0


def test_training_warns_before_the_first_step_when_memory_is_short(monkeypatch, tmp_path, demo_dataset):
    import sdlora.training.memory as memory
    from sdlora.training.trainer import Trainer

    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)
    events = []
    cfg = make_config(base_model="builtin:tiny", data_dir=str(demo_dataset), output_dir=str(tmp_path), rank=4, steps=1,
                      resolution=64)
    trainer = Trainer(cfg, on_event=events.append)
    trainer.prepare()
    warnings = [e.data["message"] for e in events if e.kind == "warning"]
    assert any("may not fit" in w and "gradient_checkpointing" in w for w in warnings), warnings
    assert trainer.memory_estimate.activations > 0


@pytest.mark.parametrize("network", ["lora", "loha", "lokr"])
def test_adapter_weights_are_not_counted_as_frozen_weights(network):
    """Injected adapter weights (LoRA's lora_A/B, LoHa's hada_*, LoKr's lokr_*) are trainable state, counted once in
    `trainable`: the frozen weights are the same before and after injection."""
    base = load_base_model("builtin:tiny")
    cfg = _cfg(network=network)
    kwargs = dict(family=base.family, unet=base.unet, text_encoders=base.text_encoders, vae=base.vae, lora_params=1000,
                  config=cfg, device=torch.device("cpu"), trained_text_encoders=[], vae_on_device=False,
                  text_encoders_on_device=False)
    before = estimate_training_memory(**kwargs)
    base.unet.requires_grad_(False)
    inject_unet(base.unet, cfg.targets, AdapterSpec.from_config(cfg))
    after = estimate_training_memory(**kwargs)
    assert (after.weights, after.resident) == (before.weights, before.resident)
