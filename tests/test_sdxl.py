"""SDXL end to end on builtin:tiny-xl: CLI run with both text encoders, kohya's SGM key names, metadata, diffusers'
own SDXL loader reproducing the trained model, learning, strength, size conditioning, resume, family mismatches."""

from __future__ import annotations

import re
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_cli
from sdlora.config.train_config import make_config
from sdlora.formats.export import read_lora
from sdlora.families import SampleGeometry
from sdlora.adapters.layers import set_strength as set_lora_scale
from sdlora.models import load_base_model
from sdlora.training.trainer import Trainer, train
from sdlora.tools.verify import apply_kohya_by_hand, check_keys, VerifyReport, verify_lora

XL = "builtin:tiny-xl"


def _config(tmp: Path, data: Path, **over):
    values = dict(base_model=XL, data_dir=str(data), output_dir=str(tmp), output_name="xl", rank=4, alpha=2.0, steps=30,
                  batch_size=2, lr=2e-3, resolution=64, seed=7, save_precision="fp32")
    values.update(over)
    return make_config(**values)


run_cli_unchecked = partial(run_cli, check=False)  # the tests read the exit status themselves


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dataset):
    """Both text encoders (one LR each), every transformer layer and conv LoRA; kept in memory for comparisons."""
    out = tmp_path_factory.mktemp("xl")
    cfg = _config(out, demo_dataset, targets=["transformer"], conv_rank=2, conv_alpha=1.0, train_text_encoder=True,
                  text_encoder_lr=[1e-3, 5e-4], steps=40)
    trainer = Trainer(cfg)
    trainer.prepare()
    return trainer, trainer.run()


def _probe(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    ids = base.family.tokenize(base.tokenizers, ["sdlora_mascot, a red circle", "a photo"])
    geometry = [SampleGeometry((96, 64), (16, 0), (64, 64)), SampleGeometry((64, 64), (0, 0), (64, 64))]
    return latents, t, ids, geometry


@torch.no_grad()
def _out(family, unet, encoders, probe):
    latents, t, ids, geometry = probe
    cond = family.conditioning(family.encode_tokens(encoders, ids), geometry)
    return family.unet_forward(unet, latents, t, cond)


def test_cli_trains_both_text_encoders_end_to_end(tmp_path, demo_dataset):
    out = tmp_path / "cli"
    proc = run_cli_unchecked("train", "--base-model", XL, "--data", demo_dataset, "--output", out, "--resolution", 64, "--steps", 4,
                   "--rank", 4, "--train-text-encoder", "--text-encoder-lr", "1e-4,5e-5", "--sample-every", 2,
                   "--sample-prompt", "a red circle --s 2 --w 64 --h 64", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last).name == "lora.safetensors" and Path(last).is_file()
    assert "SDXL model" in proc.stderr
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000002_00.png", "step000004_00.png"]
    assert Image.open(out / "samples" / "step000004_00.png").size == (64, 64)
    tensors, md = read_lora(Path(last))
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert md["ss_text_encoder_lr"] == "[0.0001, 5e-05]"
    proc = run_cli_unchecked("verify", last, "--base-model", XL)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_exported_keys_use_sgm_names(trained):
    trainer, result = trained
    tensors, md = read_lora(result.lora_path)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    te = r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    unet = r"lora_unet_(input_blocks_\d+_\d+|middle_block_\d|output_blocks_\d+_\d+)_[a-z0-9_]+"
    for p in prefixes:
        assert re.fullmatch(f"{te}|{unet}", p), p
    assert not any("down_blocks" in p or "up_blocks" in p or "mid_block" in p for p in prefixes)
    # Every block type of SDXL's layout, as kohya's networks/lora.py names them.
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k",  # second transformer layer of a block
                 "lora_unet_input_blocks_4_1_proj_in", "lora_unet_middle_block_1_proj_out",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_output_blocks_8_0_out_layers_3",  # resnet convs
                 "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op",  # downsamplers
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",  # upsamplers after attention
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_2_mlp_fc2"):
        assert name in prefixes, name
    assert "lora_unet_output_blocks_2_1_conv" not in prefixes  # the SD1 position would be wrong here
    # Shapes and alpha: linear down r x in, up out x r; conv down r x in x 3 x 3 at the conv rank.
    down = tensors["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]
    assert down.shape == (4, 64) and tensors["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"].shape == (64, 4)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 32, 3, 3)
    assert float(tensors["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 2.0
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 64)


def test_metadata_is_what_a1111_filters_on(trained):
    _, result = trained
    _, md = read_lora(result.lora_path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["modelspec.resolution"] == "64x64" and md["ss_sd_model_name"] == XL
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_steps", "ss_unet_lr", "ss_tag_frequency",
                "ss_training_finished_at", "sshs_model_hash", "ss_network_args"):
        assert md.get(key), key
    assert md["ss_text_encoder_lr"] == "[0.001, 0.0005]"


def test_diffusers_sdxl_loader_reproduces_the_trained_model(trained):
    """Every key loads through StableDiffusionXLPipeline.load_lora_weights, which must compute what training did,
    and the hand-applied W + (alpha/r)·up·down agrees."""
    trainer, result = trained
    family = trainer.family
    modules = trainer.adapted_modules()
    trained_encoders = [modules["text_encoder"].eval(), modules["text_encoder_2"].eval()]
    fresh = load_base_model(XL)
    probe = _probe(fresh)
    want = _out(family, modules["unet"].eval(), trained_encoders, probe)
    base_out = _out(family, fresh.unet, fresh.text_encoders, probe)
    pipe = fresh.make_pipeline()
    pipe.load_lora_weights(str(result.lora_path))
    got = _out(family, pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], probe)
    assert (want - base_out).abs().max() > 1e-3  # the LoRA does something
    assert (got - want).abs().max() <= 1e-5
    tensors, _ = read_lora(result.lora_path)
    ref = load_base_model(XL)
    report = VerifyReport(path="x")
    mapped = check_keys(tensors, ref.family, ref.components(), report)
    assert report.mapped == report.modules == len(mapped) and not report.unmapped and not report.problems
    apply_kohya_by_hand(ref.components(), mapped)
    by_hand = _out(family, ref.unet, ref.text_encoders, probe)
    assert (by_hand - want).abs().max() <= 1e-5
    assert verify_lora(result.lora_path, load_base_model(XL)).ok


def test_lora_learned_and_strength_zero_is_base(trained, demo_dataset):
    trainer, _ = trained
    modules = trainer.adapted_modules()
    unet, encoders = modules["unet"].eval(), [modules["text_encoder"].eval(), modules["text_encoder_2"].eval()]
    family, ds, sched = trainer.family, trainer.dataset, trainer.noise_scheduler
    g = torch.Generator().manual_seed(3)
    idx = list(range(len(ds)))
    latents = torch.stack([trainer.latents.get(ds.entries[i].item_index, False) for i in idx])
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(100, 900, (len(idx),), generator=g)
    noisy = sched.add_noise(latents, noise, t)
    text = family.encode(encoders, trainer.base.tokenizers, [ds.caption_for(0, i) for i in idx], "cpu")
    cond = family.conditioning(text, [ds.geometry_for(0, i, flip=False) for i in idx])

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(family.unet_forward(unet, noisy, t, cond), noise))

    trained_loss = loss()
    for m in (unet, *encoders):
        set_lora_scale(m, 0.0)
    try:
        base_loss = loss()
        fresh = load_base_model(XL)
        probe = _probe(fresh)
        assert torch.allclose(_out(family, unet, encoders, probe), _out(family, fresh.unet, fresh.text_encoders, probe),
                              atol=1e-6)
    finally:
        for m in (unet, *encoders):
            set_lora_scale(m, 1.0)
    assert trained_loss < base_loss * 0.95, (trained_loss, base_loss)


def test_size_conditioning_reaches_the_unet(tmp_path):
    """original size / crop top-left / target size of bucketed, cropped and flipped samples become the time ids."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), "red").save(data / "wide.png")     # landscape: a bucket wider than tall
    Image.new("RGB", (64, 160), "blue").save(data / "tall.png")   # much taller than its bucket: cropped
    for name in ("wide", "tall"):
        (data / f"{name}.txt").write_text(f"a {name} image")
    cfg = _config(tmp_path / "o", data, enable_buckets=True, random_flip=True, center_crop=False, cache_latents=False,
                  batch_size=1, steps=2, resolution=64)
    trainer = Trainer(cfg)
    trainer.prepare()
    ds = trainer.dataset
    seen = []
    for epoch in range(6):
        for i in range(len(ds)):
            item = ds.items[ds.entries[i].item_index]
            flip = ds.flip_for(epoch, i)
            geo = ds.geometry_for(epoch, i, flip=flip)
            tw, th = ds.entries[i].size
            assert geo.original_size == (item.height, item.width) and geo.target_size == (th, tw)
            # The crop the pixels really came from: same scale and random offset as the loader, mirrored when flipped.
            from sdlora.data.images import crop_box
            from sdlora.data.training_set import _rng

            (nw, nh), (left, top) = crop_box((item.width, item.height), (tw, th), crop="random",
                                             rng=_rng(cfg.seed, "crop", epoch, i))
            assert geo.crop_top_left == (top, nw - left - tw if flip else left)
            seen.append((item.path.stem, flip, geo.crop_top_left))
            _latents, cond = trainer._batch(epoch, [i])
            assert cond.time_ids.tolist() == [[*geo.original_size, *geo.crop_top_left, *geo.target_size]]
    tall = [s for s in seen if s[0] == "tall"]
    assert any(c[0] > 0 for _, _, c in tall)  # a real vertical crop offset occurred
    assert {f for _, f, _ in seen} == {True, False}
    # The UNet receives exactly these ids.
    captured = []
    real = trainer.family.unet_forward

    def spy(unet, noisy, t, cond):
        captured.append(cond.time_ids.clone())
        return real(unet, noisy, t, cond)

    trainer.family.unet_forward = spy
    try:
        trainer.position_at(0)
        trainer.train_step(0)
    finally:
        del trainer.family.unet_forward
    epoch, indices = trainer._indices(0, 0)
    geo = ds.geometry_for(epoch, indices[0], flip=ds.flip_for(epoch, indices[0]))
    assert captured[0].float().tolist() == [[*geo.original_size, *geo.crop_top_left, *geo.target_size]]


def test_resume_matches_uninterrupted_run(tmp_path, demo_dataset):
    common = dict(steps=8, save_every=4, rank=4, targets=["attn"], batch_size=2, train_text_encoder=True)
    full = train(_config(tmp_path / "full", demo_dataset, **common))
    stop = threading.Event()

    def on_event(e):
        if e.kind == "checkpoint" and e.step == 4:
            stop.set()

    part = train(_config(tmp_path / "part", demo_dataset, **common), on_event=on_event, stop_event=stop)
    assert part.stopped_early and part.steps == 4
    resumed = train(_config(tmp_path / "part", demo_dataset, resume="latest", **common))
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_diffusers_format_and_family_mismatch(tmp_path, trained):
    trainer, result = trained
    path = trainer.export(tmp_path / "d.safetensors", trainer.total_steps, fmt="diffusers", precision="fp32")
    tensors, md = read_lora(path)
    assert any(k.startswith("text_encoder_2.") for k in tensors) and "lora_adapter_metadata" in md
    assert verify_lora(path, load_base_model(XL)).ok
    # An SDXL LoRA on an SD1 base, and an SD1 LoRA on the SDXL base, are refused with a sentence.
    proc = run_cli_unchecked("generate", "--base-model", "builtin:tiny", "--lora", result.lora_path, "--prompt", "x", "--steps", 1,
                   "--out", tmp_path / "a.png")
    assert proc.returncode == 2 and "SDXL" in proc.stderr and "Traceback" not in proc.stderr
    sd1 = tmp_path / "sd1.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, sd1)
    proc = run_cli_unchecked("generate", "--base-model", XL, "--lora", sd1, "--prompt", "x", "--steps", 1, "--out", tmp_path / "b.png")
    assert proc.returncode == 2 and "SD 1.x/2.x" in proc.stderr and "SDXL" in proc.stderr, proc.stderr
    report = verify_lora(sd1, load_base_model(XL))
    assert not report.ok and any("SD 1.x/2.x" in p for p in report.problems)


def test_generate_and_strength_grid_on_sdxl(tmp_path, trained):
    _, result = trained
    proc = run_cli_unchecked("generate", "--base-model", XL, "--lora", f"{result.lora_path}:0.5", "--prompt", "a red circle",
                   "--steps", 2, "--grid", "0,1", "--out", tmp_path / "grid.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").width == 128


def test_web_ui_service_on_sdxl(tmp_path, trained):
    """What the Try and Export tabs call: family and resolution shown, strength 0 = base image, grid, export + verify."""
    import shutil

    from sdlora.ui.service import Service

    _, result = trained
    service = Service(output_root=tmp_path / "out", presets_dir=tmp_path)
    lora = service.output_root / "xl_run" / "xl.safetensors"
    lora.parent.mkdir(parents=True)
    shutil.copy(result.lora_path, lora)
    assert service.model_info(XL) == {"family": "sdxl", "label": "SDXL", "resolution": 64}
    assert service.model_info("builtin:tiny")["family"] == "sd1"
    assert str(lora) in service.list_loras()
    common = dict(prompt="a red circle", seed=3, steps=2)
    base_img = service.generate(XL, [], **common)
    zero = service.generate(XL, [(str(lora), 0.0)], **common)
    full = service.generate(XL, [(str(lora), 1.0)], **common)
    import numpy as np

    def diff(a, b):
        return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())

    # Two runs of the same CPU pipeline may differ by one grey level (kernel choice); the LoRA changes far more.
    assert diff(base_img, zero) <= 1
    assert diff(base_img, full) > 8
    grid = service.generate(XL, [(str(lora), 1.0)], grid_strengths=[0, 0.5, 1], **common)
    assert grid.width == 3 * 64
    out, summary, ok = service.export(str(lora), fmt="diffusers", precision="fp32", name="xl_export", base_spec=XL)
    assert ok and out.is_file() and summary.strip().endswith("OK"), summary


def test_low_memory_recipe_on_sdxl(tmp_path, demo_dataset):
    """sdxl-low-vram's settings: bf16, gradient checkpointing, 8-bit AdamW, cached latents and cached text-encoder
    outputs (both encoders freed after encoding); the file still verifies."""
    cfg = _config(tmp_path / "lv", demo_dataset, steps=3, mixed_precision="bf16", gradient_checkpointing=True,
                  optimizer="adamw8bit", cache_latents=True, train_text_encoder=False, sample_every=3,
                  sample_prompts=["a red circle --s 2"])
    trainer = Trainer(cfg)
    trainer.prepare()
    assert trainer.base.text_encoders == [None, None]  # owned model: both encoders dropped once captions are cached
    assert trainer.base.unet.dtype == torch.bfloat16 and trainer.base.vae.dtype == torch.float32
    result = trainer.run()
    assert result.steps == 3 and result.final_loss is not None and len(result.samples) == 1
    tensors, md = read_lora(result.lora_path)
    assert not any(k.startswith("lora_te") for k in tensors) and md["ss_network_train_unet_only"] == "True"
    assert verify_lora(result.lora_path, load_base_model(XL)).ok
