"""The training engine end to end on builtin:tiny (SD1) and builtin:tiny-xl (SDXL): kohya key names and metadata,
diffusers' own loaders reproducing the trained model, learning, strength, resume, diffusers-format export, generate;
then what only one family has (SDXL's two text encoders, size conditioning and family mismatches; SD1's data paths)."""

from __future__ import annotations

import json
import re
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import run_cli, tiny_config
from sdlora.adapters.layers import set_strength as set_lora_scale
from sdlora.families import SampleGeometry
from sdlora.formats.kohya_names import text_encoder_kohya_prefix, unet_kohya_prefix
from sdlora.formats.lora_file import check_keys, read_lora
from sdlora.models import load_base_model
from sdlora.tools.verify import apply_kohya_by_hand, VerifyReport, verify_lora
from sdlora.training.trainer import Trainer, train

XL = "builtin:tiny-xl"

REQUIRED_SS = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2", "ss_resolution",
               "ss_steps", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_num_train_images", "ss_tag_frequency",
               "ss_seed", "ss_training_started_at", "ss_training_finished_at", "ss_output_name", "sshs_model_hash"]
REQUIRED_MODELSPEC = ["sai_model_spec", "architecture", "implementation", "title", "resolution", "date", "prediction_type"]


def _sd1_shapes(trainer, tensors):
    """Linear down r x in, up out x r; a 1x1 conv stays 4-d; a 3x3 conv at the conv rank and alpha; fp32 throughout."""
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


def _sdxl_shapes(trainer, tensors):
    """Linear down r x in, up out x r; conv down r x in x 3 x 3 at the conv rank; the second encoder's layers too."""
    down = tensors["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]
    assert down.shape == (4, 64) and tensors["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"].shape == (64, 4)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 32, 3, 3)
    assert float(tensors["lora_unet_input_blocks_4_1_proj_in.alpha"]) == 2.0
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 64)


def _sd1_metadata(md):
    assert int(md["ss_num_train_images"]) == 60  # kohya counts repeats: 6 images in 10_demo
    tags = json.loads(md["ss_tag_frequency"])
    assert tags and all(isinstance(v, dict) for v in tags.values())
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"])
    assert re.fullmatch(r"[0-9a-f]{64}", md["sshs_model_hash"])


def _sdxl_metadata(md):
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_steps", "ss_unet_lr", "ss_tag_frequency",
                "ss_training_finished_at", "sshs_model_hash", "ss_network_args"):
        assert md.get(key), key


# What differs between the families: the model, the trained run, the names kohya gives its modules, what A1111 and
# ComfyUI read from the metadata, and the resume run.
FAMILY_RUNS = {
    "sd1": dict(
        base="builtin:tiny", output_name="t", steps=60, text_encoder_lr=1e-3, encoders=["text_encoder"],
        key_pattern=r"lora_unet_[a-z0-9_]+|lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])",
        keys_present=["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                      "lora_unet_mid_block_attentions_0_proj_in",
                      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                      "lora_unet_down_blocks_0_resnets_0_conv1",
                      "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                      "lora_te_text_model_encoder_layers_1_mlp_fc1"],
        keys_absent=[], names_absent=["lora_te1_"],
        shapes=_sd1_shapes,
        metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_v2": "False", "ss_base_model_version": "sd_v1",
                  "modelspec.architecture": "stable-diffusion-v1/lora", "ss_steps": "60", "ss_text_encoder_lr": "0.001"},
        metadata_checks=_sd1_metadata,
        diffusers_keys=["unet."],
        resume=dict(steps=12, stop_at=8, over=dict(save_precision="fp32")),
    ),
    "sdxl": dict(
        base=XL, output_name="xl", steps=40, text_encoder_lr=[1e-3, 5e-4], encoders=["text_encoder", "text_encoder_2"],
        key_pattern=r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
                    r"|lora_unet_(input_blocks_\d+_\d+|middle_block_\d|output_blocks_\d+_\d+)_[a-z0-9_]+",
        # Every block type of SDXL's layout, as kohya's networks/lora.py names them.
        keys_present=["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                      "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k",  # second transformer layer of a block
                      "lora_unet_input_blocks_4_1_proj_in", "lora_unet_middle_block_1_proj_out",
                      "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                      "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_output_blocks_8_0_out_layers_3",  # resnet convs
                      "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op",  # downsamplers
                      "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv",  # upsamplers after attention
                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                      "lora_te2_text_model_encoder_layers_2_mlp_fc2"],
        keys_absent=["lora_unet_output_blocks_2_1_conv"],  # the SD1 position would be wrong here
        names_absent=["down_blocks", "up_blocks", "mid_block"],
        shapes=_sdxl_shapes,
        metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                  "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                  "modelspec.resolution": "64x64", "ss_sd_model_name": XL, "ss_text_encoder_lr": "[0.001, 0.0005]"},
        metadata_checks=_sdxl_metadata,
        diffusers_keys=["unet.", "text_encoder_2."],
        resume=dict(steps=8, stop_at=4, over=dict(train_text_encoder=True)),
    ),
}
FAMILIES = list(FAMILY_RUNS)


def _config(out: Path, data: Path, family: str = "sd1", **over):
    run = FAMILY_RUNS[family]
    values = dict(output_name=run["output_name"], rank=4, alpha=2.0, steps=30, lr=2e-3, seed=7, save_precision="fp32")
    values.update(over)
    return tiny_config(out, data, run["base"], **values)


run_cli_unchecked = partial(run_cli, check=False)  # the tests read the exit status themselves


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, demo_dataset):
    """Text-encoder LoRA (SDXL: both encoders, one LR each), every transformer layer and conv LoRA; kept in memory for
    comparisons. Yields (family, trainer, result)."""
    family = request.param
    run = FAMILY_RUNS[family]
    out = tmp_path_factory.mktemp(f"trained_{family}")
    cfg = _config(out, demo_dataset, family, targets=["transformer"], conv_rank=2, conv_alpha=1.0, train_text_encoder=True,
                  text_encoder_lr=run["text_encoder_lr"], steps=run["steps"])
    trainer = Trainer(cfg)
    trainer.prepare()
    return family, trainer, trainer.run()


only_sd1 = pytest.mark.parametrize("trained", ["sd1"], indirect=True)
only_sdxl = pytest.mark.parametrize("trained", ["sdxl"], indirect=True)


def _sd1_probe(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    ids = base.tokenizer(["sdlora_mascot, a red circle", "a photo"], padding="max_length", max_length=base.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return latents, t, ids


def _sdxl_probe(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    ids = base.family.tokenize(base.tokenizers, ["sdlora_mascot, a red circle", "a photo"])
    geometry = [SampleGeometry((96, 64), (16, 0), (64, 64)), SampleGeometry((64, 64), (0, 0), (64, 64))]
    return latents, t, ids, geometry


def _probe(base, seed=0):
    return (_sdxl_probe if base.family.name == "sdxl" else _sd1_probe)(base, seed)


@torch.no_grad()
def _out(family, unet, encoders, probe):
    """The UNet's prediction on the probe, the text encoded by ENCODERS: SD1 directly, SDXL through its conditioning."""
    if family.name == "sdxl":
        latents, t, ids, geometry = probe
        cond = family.conditioning(family.encode_tokens(encoders, ids), geometry)
        return family.unet_forward(unet, latents, t, cond)
    latents, t, ids = probe
    return unet(latents, t, encoders[0](ids)[0]).sample


# --- the same on both families -----------------------------------------------------------------------------------


def test_exported_keys_follow_kohya_naming(trained):
    family, trainer, result = trained
    run = FAMILY_RUNS[family]
    tensors, md = read_lora(result.lora_path)
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for p in prefixes:
        assert re.fullmatch(run["key_pattern"], p), p
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert f"{p}.{suffix}" in tensors
    for name in run["keys_present"]:
        assert name in prefixes, name
    for name in run["keys_absent"]:
        assert name not in prefixes, name
    assert not any(part in p for p in prefixes for part in run["names_absent"])
    run["shapes"](trainer, tensors)


def test_metadata_has_kohya_and_modelspec_keys(trained):
    """What A1111 and ComfyUI filter on: kohya's ss_* keys and the modelspec ones, all strings."""
    family, _, result = trained
    run = FAMILY_RUNS[family]
    with safe_open(str(result.lora_path), "pt") as fh:
        md = fh.metadata()
    assert all(isinstance(v, str) for v in md.values())
    for k in REQUIRED_SS:
        assert k in md, k
    for k in REQUIRED_MODELSPEC:
        assert f"modelspec.{k}" in md, k
    for k, v in run["metadata"].items():
        assert md[k] == v, k
    run["metadata_checks"](md)


def test_every_key_maps_and_diffusers_reproduces_trained_output(trained):
    """Every key loads through the family's diffusers pipeline (load_lora_weights), which must compute what training
    did, and the hand-applied W + (alpha/r)·up·down agrees."""
    name, trainer, result = trained
    base_spec = FAMILY_RUNS[name]["base"]
    family = trainer.family
    modules = trainer.adapted_modules()
    trained_encoders = [modules[n].eval() for n in FAMILY_RUNS[name]["encoders"]]
    fresh = load_base_model(base_spec)
    probe = _probe(fresh)
    want = _out(family, modules["unet"].eval(), trained_encoders, probe)
    base_out = _out(family, fresh.unet, fresh.text_encoders, probe)
    # diffusers' own loader
    pipe = fresh.make_pipeline()
    pipe.load_lora_weights(str(result.lora_path), adapter_name="x")
    got = _out(family, pipe.unet, [getattr(pipe, n) for n in FAMILY_RUNS[name]["encoders"]], probe)
    assert (want - base_out).abs().max() > 1e-3  # the LoRA does something
    assert (got - want).abs().max() <= 1e-5
    # hand-applied kohya math on a fresh copy
    tensors, _ = read_lora(result.lora_path)
    ref = load_base_model(base_spec)
    report = VerifyReport(path=str(result.lora_path))
    mapped = check_keys(tensors, ref.family, ref.components(), report)
    assert report.unmapped == [] and report.problems == [] and report.mapped == report.modules == len(mapped) > 0
    apply_kohya_by_hand(ref.components(), mapped)
    by_hand = _out(family, ref.unet, ref.text_encoders, probe)
    assert (by_hand - want).abs().max() <= 1e-5
    # and the library's verify says the same
    full = verify_lora(result.lora_path, load_base_model(base_spec))
    assert full.ok, full.summary()


def test_resume_matches_uninterrupted_run(tmp_path, demo_dataset, family):
    resume = FAMILY_RUNS[family]["resume"]
    steps, stop_at = resume["steps"], resume["stop_at"]
    common = dict(steps=steps, save_every=4, rank=4, targets=["attn"], batch_size=2, **resume["over"])
    full = train(_config(tmp_path / "full", demo_dataset, family, **common))
    # Interrupted run: stop right after a checkpoint, then resume from it.
    stop = threading.Event()

    def on_event(e):
        if e.kind == "checkpoint" and e.step == stop_at:
            stop.set()

    part = train(_config(tmp_path / "part", demo_dataset, family, **common), on_event=on_event, stop_event=stop)
    assert part.stopped_early and part.steps == stop_at
    resumed = train(_config(tmp_path / "part", demo_dataset, family, resume="latest", **common))
    assert resumed.steps == steps
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys()
    if family == "sdxl":
        assert any(k.startswith("lora_te2_") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    log = [json.loads(line) for line in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_diffusers_format_export_roundtrips(tmp_path, trained):
    name, trainer, result = trained
    base_spec = FAMILY_RUNS[name]["base"]
    path = trainer.export(tmp_path / "d.safetensors", trainer.total_steps, fmt="diffusers", precision="fp32")
    tensors, md = read_lora(path)
    assert any(k.startswith("unet.") and ".lora_A." in k for k in tensors)
    for prefix in FAMILY_RUNS[name]["diffusers_keys"]:
        assert any(k.startswith(prefix) for k in tensors), prefix
    assert "lora_adapter_metadata" in md
    a, b = load_base_model(base_spec), load_base_model(base_spec)
    probe = _probe(a)
    pa, pb = a.make_pipeline(), b.make_pipeline()
    pa.load_lora_weights(str(path), adapter_name="x")
    pb.load_lora_weights(str(result.lora_path), adapter_name="x")
    encoders = FAMILY_RUNS[name]["encoders"]
    oa = _out(a.family, pa.unet, [getattr(pa, n) for n in encoders], probe)
    ob = _out(b.family, pb.unet, [getattr(pb, n) for n in encoders], probe)
    assert (oa - ob).abs().max() <= 1e-5
    assert verify_lora(path, load_base_model(base_spec)).ok


def test_generate_and_strength_grid(tmp_path, trained):
    name, _, result = trained
    proc = run_cli_unchecked("generate", "--base-model", FAMILY_RUNS[name]["base"], "--lora", f"{result.lora_path}:0.5",
                             "--prompt", "a red circle", "--steps", 2, "--grid", "0,1", "--out", tmp_path / "grid.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").width == 128


# --- SD1 ---------------------------------------------------------------------------------------------------------


def test_text_encoder_mapping_is_explicit():
    # transformers 4 paths (text_model.encoder...) and 5 paths (encoder...) give the same kohya name
    assert text_encoder_kohya_prefix("text_model.encoder.layers.11.self_attn.out_proj") == "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert text_encoder_kohya_prefix("encoder.layers.11.self_attn.out_proj") == "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert text_encoder_kohya_prefix("encoder.layers.0.mlp.fc2") == "lora_te_text_model_encoder_layers_0_mlp_fc2"
    assert unet_kohya_prefix("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"
    with pytest.raises(Exception):
        text_encoder_kohya_prefix("encoder.layers.0.layer_norm1")


@only_sd1
def test_sd1_lora_learned_something(trained, demo_dataset):
    """Denoising loss on the training images over fixed noises/timesteps is lower with the LoRA."""
    _, trainer, _ = trained
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


@only_sd1
def test_sd1_strength_scales_the_effect(trained):
    _, _, result = trained
    base = load_base_model("builtin:tiny")
    latents, t, ids = _sd1_probe(base)
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


@only_sd1
def test_verify_on_a_base_that_already_carries_a_lora(trained):
    _, _, result = trained
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


# --- SDXL --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdxl_cli_trains_both_text_encoders_end_to_end(tmp_path, demo_dataset):
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


@only_sdxl
def test_sdxl_lora_learned_and_strength_zero_is_base(trained, demo_dataset):
    _, trainer, _ = trained
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
        probe = _sdxl_probe(fresh)
        assert torch.allclose(_out(family, unet, encoders, probe), _out(family, fresh.unet, fresh.text_encoders, probe),
                              atol=1e-6)
    finally:
        for m in (unet, *encoders):
            set_lora_scale(m, 1.0)
    assert trained_loss < base_loss * 0.95, (trained_loss, base_loss)


def test_sdxl_size_conditioning_reaches_the_unet(tmp_path):
    """original size / crop top-left / target size of bucketed, cropped and flipped samples become the time ids."""
    from sdlora.data.draws import sample_rng
    from sdlora.data.images import crop_box

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), "red").save(data / "wide.png")     # landscape: a bucket wider than tall
    Image.new("RGB", (64, 160), "blue").save(data / "tall.png")   # much taller than its bucket: cropped
    for name in ("wide", "tall"):
        (data / f"{name}.txt").write_text(f"a {name} image")
    cfg = _config(tmp_path / "o", data, "sdxl", enable_buckets=True, random_flip=True, center_crop=False, cache_latents=False,
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
            (nw, nh), (left, top) = crop_box((item.width, item.height), (tw, th), crop="random",
                                             rng=sample_rng(cfg.seed, "crop", epoch, i))
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


@only_sdxl
def test_sdxl_and_sd1_loras_are_refused_on_the_other_family(tmp_path, trained):
    _, _, result = trained
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


@only_sdxl
def test_web_ui_service_on_sdxl(tmp_path, trained):
    """What the Try and Export tabs call: family and resolution shown, strength 0 = base image, grid, export + verify."""
    import shutil

    import numpy as np

    from sdlora.ui.services import Services

    _, _, result = trained
    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path)
    lora = service.output_root / "xl_run" / "xl.safetensors"
    lora.parent.mkdir(parents=True)
    shutil.copy(result.lora_path, lora)
    assert service.models.model_info(XL) == {"family": "sdxl", "label": "SDXL", "resolution": 64}
    assert service.models.model_info("builtin:tiny")["family"] == "sd1"
    assert str(lora) in service.loras.list_loras()
    common = dict(prompt="a red circle", seed=3, steps=2)
    base_img = service.tryout.generate(XL, [], **common)
    zero = service.tryout.generate(XL, [(str(lora), 0.0)], **common)
    full = service.tryout.generate(XL, [(str(lora), 1.0)], **common)

    def diff(a, b):
        return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())

    # Two runs of the same CPU pipeline may differ by one grey level (kernel choice); the LoRA changes far more.
    assert diff(base_img, zero) <= 1
    assert diff(base_img, full) > 8
    grid = service.tryout.generate(XL, [(str(lora), 1.0)], grid_strengths=[0, 0.5, 1], **common)
    assert grid.width == 3 * 64
    out, summary, ok = service.exporter.export(str(lora), fmt="diffusers", precision="fp32", name="xl_export", base_spec=XL)
    assert ok and out.is_file() and summary.strip().endswith("OK"), summary


def test_sdxl_low_memory_recipe(tmp_path, demo_dataset):
    """sdxl-low-vram's settings: bf16, gradient checkpointing, 8-bit AdamW, cached latents and cached text-encoder
    outputs (both encoders freed after encoding); the file still verifies."""
    cfg = _config(tmp_path / "lv", demo_dataset, "sdxl", steps=3, mixed_precision="bf16", gradient_checkpointing=True,
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
