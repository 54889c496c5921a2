"""The training engine on builtin:tiny: export naming and numerics, learning, strength, resume."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdlora.config.train_config import make_config
from sdlora.formats.export import read_lora, text_encoder_kohya_prefix, unet_kohya_prefix
from sdlora.adapters.layers import set_strength as set_lora_scale
from sdlora.models import load_base_model
from sdlora.training.trainer import Trainer, train
from sdlora.tools.verify import apply_kohya_by_hand, check_keys, VerifyReport, verify_lora

REQUIRED_SS = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2", "ss_resolution",
               "ss_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_num_train_images", "ss_tag_frequency",
               "ss_seed", "ss_training_started_at", "ss_training_finished_at", "ss_output_name", "sshs_model_hash"]
REQUIRED_MODELSPEC = ["sai_model_spec", "architecture", "implementation", "title", "resolution", "date", "prediction_type"]


def _config(tmp: Path, data: Path, **over):
    values = dict(base_model="builtin:tiny", data_dir=str(data), output_dir=str(tmp), output_name="t", rank=4, alpha=2.0,
                  steps=30, batch_size=2, lr=2e-3, resolution=64, seed=7, save_precision="fp32")
    values.update(over)
    return make_config(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dataset):
    """One run with text-encoder LoRA, every transformer layer and conv LoRA, kept in memory for comparisons."""
    out = tmp_path_factory.mktemp("trained")
    cfg = _config(out, demo_dataset, targets=["transformer"], conv_rank=2, conv_alpha=1.0, train_text_encoder=True,
                  text_encoder_lr=1e-3, steps=60)
    trainer = Trainer(cfg)
    trainer.prepare()
    result = trainer.run()
    return trainer, result


def _probe(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    ids = base.tokenizer(["sdlora_mascot, a red circle", "a photo"], padding="max_length", max_length=base.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return latents, t, ids


def test_exported_keys_follow_kohya_naming(trained):
    trainer, result = trained
    tensors, md = read_lora(result.lora_path)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for p in prefixes:
        assert re.fullmatch(r"lora_unet_[a-z0-9_]+|lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])", p), p
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert f"{p}.{suffix}" in tensors
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in prefixes
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in prefixes
    assert "lora_unet_mid_block_attentions_0_proj_in" in prefixes
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj" in prefixes
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in prefixes
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in prefixes
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1" in prefixes
    assert not any(p.startswith("lora_te1_") for p in prefixes)
    # shapes and alphas
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    q = trainer.base.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").base_layer
    assert tuple(tensors[f"{linear}.lora_down.weight"].shape) == (4, q.in_features)
    assert tuple(tensors[f"{linear}.lora_up.weight"].shape) == (q.out_features, 4)
    assert tensors[f"{linear}.alpha"].dim() == 0 and float(tensors[f"{linear}.alpha"]) == 2.0
    conv1x1 = "lora_unet_mid_block_attentions_0_proj_in"
    assert tensors[f"{conv1x1}.lora_down.weight"].dim() == 4 and tensors[f"{conv1x1}.lora_down.weight"].shape[2:] == (1, 1)
    conv3 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv3}.lora_down.weight"].shape[0] == 2 and tensors[f"{conv3}.lora_down.weight"].shape[2:] == (3, 3)
    assert float(tensors[f"{conv3}.alpha"]) == 1.0
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_metadata_has_kohya_and_modelspec_keys(trained):
    _, result = trained
    with safe_open(str(result.lora_path), "pt") as fh:
        md = fh.metadata()
    assert all(isinstance(v, str) for v in md.values())
    for k in REQUIRED_SS:
        assert k in md, k
    for k in REQUIRED_MODELSPEC:
        assert f"modelspec.{k}" in md, k
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_steps"] == "60"
    assert md["ss_text_encoder_lr"] == "0.001"
    assert int(md["ss_num_train_images"]) == 60  # kohya counts repeats: 6 images in 10_demo
    tags = json.loads(md["ss_tag_frequency"])
    assert tags and all(isinstance(v, dict) for v in tags.values())
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"])
    assert re.fullmatch(r"[0-9a-f]{64}", md["sshs_model_hash"])


def test_text_encoder_mapping_is_explicit():
    # transformers 4 paths (text_model.encoder...) and 5 paths (encoder...) give the same kohya name
    assert text_encoder_kohya_prefix("text_model.encoder.layers.11.self_attn.out_proj") == "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert text_encoder_kohya_prefix("encoder.layers.11.self_attn.out_proj") == "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert text_encoder_kohya_prefix("encoder.layers.0.mlp.fc2") == "lora_te_text_model_encoder_layers_0_mlp_fc2"
    assert unet_kohya_prefix("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"
    with pytest.raises(Exception):
        text_encoder_kohya_prefix("encoder.layers.0.layer_norm1")


def test_every_key_maps_and_diffusers_reproduces_trained_output(trained):
    trainer, result = trained
    trained_unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
    trained_te = trainer.accelerator.unwrap_model(trainer.text_encoders[0]).eval()
    fresh = load_base_model("builtin:tiny")
    latents, t, ids = _probe(fresh)
    with torch.no_grad():
        hidden = trained_te(ids)[0]
        want = trained_unet(latents, t, hidden).sample
        base_out = fresh.unet(latents, t, fresh.text_encoder(ids)[0]).sample
    # diffusers' own loader
    pipe = fresh.make_pipeline()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="x")
    with torch.no_grad():
        got = pipe.unet(latents, t, pipe.text_encoder(ids)[0]).sample
    assert (want - base_out).abs().max() > 1e-3  # the LoRA does something
    assert (got - want).abs().max() <= 1e-5
    # hand-applied kohya math on a fresh copy
    tensors, _ = read_lora(result.lora_path)
    ref = load_base_model("builtin:tiny")
    report = VerifyReport(path=str(result.lora_path))
    mapped = check_keys(tensors, ref.family, ref.components(), report)
    assert report.unmapped == [] and report.problems == [] and report.mapped == report.modules > 0
    apply_kohya_by_hand(ref.components(), mapped)
    with torch.no_grad():
        by_hand = ref.unet(latents, t, ref.text_encoder(ids)[0]).sample
    assert (by_hand - want).abs().max() <= 1e-5
    # and the library's verify says the same
    full = verify_lora(result.lora_path, load_base_model("builtin:tiny"))
    assert full.ok, full.summary()


def test_lora_learned_something(trained, demo_dataset):
    """Denoising loss on the training images over fixed noises/timesteps is lower with the LoRA."""
    trainer, _ = trained
    unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
    te = trainer.accelerator.unwrap_model(trainer.text_encoders[0]).eval()
    ds = trainer.dataset
    latents = torch.stack([trainer.latents.get(e.item_index, False) for e in ds.entries[: len(ds.items) * 1: 1]][:6])
    captions = [ds.fixed_caption(e.item_index) for e in ds.entries[:6]]
    ids = trainer.base.tokenizer(captions, padding="max_length", max_length=trainer.base.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
    sched = trainer.noise_scheduler

    def loss_at(scale):
        set_lora_scale(unet, scale)
        set_lora_scale(te, scale)
        total = 0.0
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            hidden = te(ids)[0]
            for _ in range(8):
                noise = torch.randn(latents.shape, generator=gen)
                ts = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
                pred = unet(sched.add_noise(latents, noise, ts), ts, hidden).sample
                total += torch.nn.functional.mse_loss(pred, noise).item()
        return total / 8

    try:
        with_lora, without = loss_at(1.0), loss_at(0.0)
    finally:
        set_lora_scale(unet, 1.0)
        set_lora_scale(te, 1.0)
    assert with_lora < without * 0.95, (with_lora, without)


def test_strength_scales_the_effect(trained):
    _, result = trained
    base = load_base_model("builtin:tiny")
    latents, t, ids = _probe(base)
    with torch.no_grad():
        base_out = base.unet(latents, t, base.text_encoder(ids)[0]).sample
    pipe = base.make_pipeline()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.0])
    with torch.no_grad():
        zero = pipe.unet(latents, t, pipe.text_encoder(ids)[0]).sample
    assert torch.equal(zero, base_out)
    # weight space: strength 0.5 moves every weight exactly halfway
    tensors, _ = read_lora(result.lora_path)
    full, half = load_base_model("builtin:tiny"), load_base_model("builtin:tiny")
    for model, s in ((full, 1.0), (half, 0.5)):
        r = VerifyReport(path="")
        apply_kohya_by_hand(model.components(), check_keys(tensors, model.family, model.components(), r), strength=s)
    w0 = base.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k").weight
    w1 = full.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k").weight
    wh = half.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_k").weight
    assert (w1 - w0).abs().max() > 0
    torch.testing.assert_close(wh - w0, (w1 - w0) / 2, atol=1e-6, rtol=1e-4)


def test_resume_matches_uninterrupted_run(tmp_path, demo_dataset):
    common = dict(steps=12, save_every=4, rank=4, targets=["attn"], batch_size=2, save_precision="fp32")
    full = train(_config(tmp_path / "full", demo_dataset, **common))
    # Interrupted run: stop right after the step-8 checkpoint, then resume from it.
    stop = threading.Event()

    def on_event(e):
        if e.kind == "checkpoint" and e.step == 8:
            stop.set()

    part = train(_config(tmp_path / "part", demo_dataset, **common), on_event=on_event, stop_event=stop)
    assert part.stopped_early and part.steps == 8
    resumed = train(_config(tmp_path / "part", demo_dataset, resume="latest", **common))
    assert resumed.steps == 12
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    log = [json.loads(line) for line in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))


def test_diffusers_format_export_roundtrips(tmp_path, trained):
    trainer, result = trained
    path = trainer.export(tmp_path / "d.safetensors", trainer.total_steps, fmt="diffusers", precision="fp32")
    tensors, md = read_lora(path)
    assert any(k.startswith("unet.") and ".lora_A." in k for k in tensors)
    assert "lora_adapter_metadata" in md
    a, b = load_base_model("builtin:tiny"), load_base_model("builtin:tiny")
    latents, t, ids = _probe(a)
    pa, pb = a.make_pipeline(), b.make_pipeline()
    pa.load_lora_weights(str(path), adapter_name="x")
    pb.load_lora_weights(str(result.lora_path), adapter_name="x")
    with torch.no_grad():
        oa = pa.unet(latents, t, pa.text_encoder(ids)[0]).sample
        ob = pb.unet(latents, t, pb.text_encoder(ids)[0]).sample
    assert (oa - ob).abs().max() <= 1e-5
    assert verify_lora(path, load_base_model("builtin:tiny")).ok


def test_verify_on_a_base_that_already_carries_a_lora(trained):
    _, result = trained
    base = load_base_model("builtin:tiny")
    pipe = base.make_pipeline()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="already")
    before = {k: v.clone() for k, v in {**base.unet.state_dict(), **base.text_encoder.state_dict()}.items()}
    report = verify_lora(result.lora_path, base)
    assert report.ok, report.summary()
    assert report.lora_effect > 1e-3
    # Verify runs on the shared modules and gives them back as they were: weights, the adapter, and that it is active.
    after = {**base.unet.state_dict(), **base.text_encoder.state_dict()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.get_active_adapters() == ["already"]
    bare = load_base_model("builtin:tiny")
    assert verify_lora(result.lora_path, bare).ok and not getattr(bare.unet, "peft_config", None)


def _mixed_aspect_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(96, 64), (64, 96), (64, 64), (128, 64), (64, 128)]):
        Image.effect_noise(size, 30 + 5 * i).convert("RGB").save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"tag{i}, noise, sample {i}")
    return folder


def test_uncached_random_crop_buckets_accumulation_resume(tmp_path):
    """The on-the-fly path (workers decode ahead), buckets, flips, shuffled tags and accumulation still resume exactly."""
    data = _mixed_aspect_dataset(tmp_path / "mixed")
    common = dict(steps=9, save_every=3, cache_latents=False, center_crop=False, random_flip=True, enable_buckets=True,
                  grad_accum=3, batch_size=2, num_workers=2, shuffle_tags=True, keep_tokens=1, caption_dropout=0.2,
                  resolution=64, save_precision="fp32", targets=["attn2"])
    events = []
    full = train(_config(tmp_path / "full", data, **common), on_event=events.append)
    stop = threading.Event()
    part = train(_config(tmp_path / "part", data, **common), stop_event=stop,
                 on_event=lambda e: stop.set() if e.kind == "checkpoint" and e.step == 6 else None)
    assert part.steps == 6
    resumed = train(_config(tmp_path / "part", data, resume="latest", **common))
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    # Each step logs how long it waited for data (decoded ahead in worker threads, VAE-encoded in the step).
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_seconds"] <= r["seconds"] for r in log)
    steps = [e for e in events if e.kind == "step"]
    assert all("data_seconds" in e.data for e in steps)


def test_v_prediction_training_and_metadata(tmp_path, demo_dataset):
    result = train(_config(tmp_path, demo_dataset, steps=4, prediction_type="v_prediction", min_snr_gamma=5.0))
    _, md = read_lora(result.lora_path)
    assert md["modelspec.prediction_type"] == "v" and md["ss_prediction_type"] == "v_prediction"


def test_bucket_no_upscale_trains_small_images_at_their_own_size(tmp_path):
    """Images smaller than resolution² are encoded at their own (step-rounded) size, larger ones in the usual buckets."""
    data = _mixed_aspect_dataset(tmp_path / "mixed")  # 64x64 .. 128x64, all below 128² px
    trainer = Trainer(_config(tmp_path / "out", data, resolution=128, enable_buckets=True, bucket_no_upscale=True, steps=2,
                              batch_size=1))
    trainer.prepare()
    sizes = {trainer.report.items[e.item_index].path.name: e.size for e in trainer.dataset.entries}
    assert sizes == {"im0.png": (96, 64), "im1.png": (64, 96), "im2.png": (64, 64), "im3.png": (128, 64), "im4.png": (64, 128)}
    for e in trainer.dataset.entries:
        w, h = e.size
        assert trainer.latents.get(e.item_index, False).shape == (4, h // 8, w // 8)
    assert trainer.run().steps == 2
