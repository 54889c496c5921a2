"""kohya's training options: clip skip, the timestep range, Huber losses, pyramid and input-perturbation noise, zero
terminal SNR, debiased estimation, max-norm regularisation and caption tag dropout. Each is measured against its
formula on fixed tensors or on the built-in tiny model; the settings' checks, CLI flags and metadata too."""

from __future__ import annotations

import contextlib
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from conftest import tiny_config
from sdlora.config.train_config import ConfigError, make_config
from sdlora.data.captions import build_caption
from sdlora.families import family
from sdlora.inference.sampling import SamplePrompt, generate
from sdlora.training import losses, noise
from sdlora.training.max_norm import apply_max_norm
from sdlora.training.objective import denoising_error

KOHYA_KEYS = ("ss_clip_skip", "ss_min_timestep", "ss_max_timestep", "ss_loss_type", "ss_huber_schedule", "ss_huber_c",
              "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_ip_noise_gamma", "ss_zero_terminal_snr",
              "ss_debiased_estimation", "ss_scale_weight_norms", "ss_caption_tag_dropout_rate")


def _cfg(**over):
    return make_config(base_model="builtin:tiny", data_dir="builtin:demo", **over)


# clip skip ----------------------------------------------------------------------------------------------------------

def _final_norm(encoder):
    return getattr(encoder, "text_model", encoder).final_layer_norm


@torch.no_grad()
def test_clip_skip_is_the_final_layer_norm_of_that_hidden_state(tiny):
    fam, encoders, tokenizers = tiny.family, tiny.text_encoders, tiny.tokenizers
    ids = fam.tokenize(tokenizers, ["a red cube, studio light"])[0]
    out = encoders[0](ids, output_hidden_states=True)
    layers = encoders[0].config.num_hidden_layers
    for k in range(1, layers + 1):
        got = fam.encode(encoders, tokenizers, ["a red cube, studio light"], "cpu", clip_skip=k).hidden
        torch.testing.assert_close(got, _final_norm(encoders[0])(out.hidden_states[-k]))
    # clip_skip 1 is the encoder's own last hidden state; 2 is another tensor
    torch.testing.assert_close(fam.encode(encoders, tokenizers, ["a red cube, studio light"], "cpu").hidden,
                               out.last_hidden_state)
    two = fam.encode(encoders, tokenizers, ["a red cube, studio light"], "cpu", clip_skip=2).hidden
    assert not torch.allclose(two, out.last_hidden_state)
    assert fam.clip_skip_problem(layers + 1, encoders) and "layers" in fam.clip_skip_problem(layers + 1, encoders)


@torch.no_grad()
def test_generate_with_clip_skip_uses_the_training_conditioning(tiny):
    pipe = tiny.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sample = SamplePrompt(prompt="a red cube", negative="blurry", seed=3, steps=2, width=64, height=64)

    def encode(text):
        return tiny.family.encode(tiny.text_encoders, tiny.tokenizers, [text], "cpu", clip_skip=2)

    by_clip_skip = np.asarray(generate(pipe, sample, default_size=64, clip_skip=2, family=tiny.family))
    by_embeds = np.asarray(generate(pipe, sample, default_size=64, prompt_embeds=tiny.family.prompt_embeds_kwargs(
        encode("a red cube"), encode("blurry"))))
    plain = np.asarray(generate(pipe, sample, default_size=64))
    assert np.array_equal(by_clip_skip, by_embeds)
    assert not np.array_equal(by_clip_skip, plain)


def test_cli_generate_takes_clip_skip(tmp_path, tiny):
    from PIL import Image

    from conftest import run_cli

    out = tmp_path / "cs2.png"
    run_cli("generate", "--prompt", "a red cube", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64",
            "--clip-skip", "2", "--out", out)
    pipe = tiny.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sample = SamplePrompt(prompt="a red cube", seed=3, steps=2, width=64, height=64)
    want = np.asarray(generate(pipe, sample, default_size=64, clip_skip=2, family=tiny.family))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want)


@torch.no_grad()
def test_text_cache_is_keyed_by_clip_skip(tiny):
    from sdlora.data.caches import TextEmbeddingCache

    one = TextEmbeddingCache(tiny.family, tiny.tokenizers, tiny.text_encoders, "cpu")
    two = TextEmbeddingCache(tiny.family, tiny.tokenizers, tiny.text_encoders, "cpu", clip_skip=2)
    a, b = one.get(["a cat"]).hidden, two.get(["a cat"]).hidden
    assert not torch.allclose(a, b)
    assert set(one.memory) == {(1, "a cat")} and set(two.memory) == {(2, "a cat")}
    torch.testing.assert_close(b, tiny.family.encode(tiny.text_encoders, tiny.tokenizers, ["a cat"], "cpu", 2).hidden)


def test_sdxl_refuses_clip_skip_with_a_sentence(tiny):
    sdxl = family("sdxl")
    assert sdxl.clip_skip_problem(1, []) is None
    message = sdxl.clip_skip_problem(2, [])
    assert "SDXL" in message and "penultimate" in message and "clip_skip = 1" in message
    run = SimpleNamespace(config=_cfg(clip_skip=2), family=sdxl, base=tiny, prediction_type="epsilon")
    with pytest.raises(ConfigError, match="SDXL"):
        noise.check_objective(run)


# timesteps ----------------------------------------------------------------------------------------------------------

def test_timesteps_are_drawn_in_min_max():
    cfg = _cfg(min_timestep=200, max_timestep=300)
    t = noise.draw_timesteps(cfg, 1000, 5000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 299
    # unset: the whole schedule, the very draws a run without the option makes
    plain = noise.draw_timesteps(_cfg(), 1000, 64, torch.Generator().manual_seed(1))
    assert torch.equal(plain, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1)))


# losses -------------------------------------------------------------------------------------------------------------

def test_huber_and_smooth_l1_follow_their_formulas_for_each_schedule():
    sched = DDPMScheduler(num_train_timesteps=1000)
    pred = torch.tensor([0.0, 0.5, -2.0, 3.0]).view(1, 4, 1, 1).repeat(2, 1, 1, 1)
    target = torch.zeros_like(pred)
    t = torch.tensor([0, 999])
    c = 0.1
    ac = sched.alphas_cumprod[t].double()
    expected_c = {"constant": [c, c], "exponential": [1.0, math.exp(-(-math.log(c) / 1000) * 999)],
                  "snr": ((1 - c) / (1 + ((1 - ac) / ac) ** 0.5) ** 2 + c).tolist()}
    for schedule, cs in expected_c.items():
        got_c = losses.huber_threshold("huber", schedule, c, sched, t)
        torch.testing.assert_close(got_c.double(), torch.tensor(cs, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        for loss_type in ("huber", "smooth_l1"):
            got = losses.elementwise_loss(pred, target, loss_type, got_c)
            for i, ci in enumerate(cs):
                d = pred[i].double()
                soft = torch.sqrt(d ** 2 + ci ** 2) - ci
                want = 2 * ci * soft if loss_type == "huber" else 2 * soft
                torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-7)
    assert losses.huber_threshold("l2", "snr", c, sched, t) is None
    torch.testing.assert_close(losses.elementwise_loss(pred, target, "l2", None), pred ** 2)
    # the exponential schedule starts at 1 and reaches c at the end of the schedule
    end = losses.huber_threshold("huber", "exponential", c, sched, torch.tensor([1000]))
    torch.testing.assert_close(end, torch.tensor([c]))


def test_debiased_weights_are_one_over_sqrt_snr_capped():
    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 10, 500, 999])
    ac = sched.alphas_cumprod[t].double()
    snr = torch.clamp(ac / (1 - ac), max=1000)
    torch.testing.assert_close(losses.debiased_weights(sched, t, "epsilon").double(), 1 / torch.sqrt(snr), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses.debiased_weights(sched, t, "v_prediction").double(), 1 / (snr + 1), rtol=1e-5, atol=0)
    assert float(snr[0]) == 1000  # the nearly noise-free end is capped


def _stub_run(cfg, predict=None):
    """What denoising_error reads; the "UNet" records its input and predicts zeros (or `predict`)."""
    seen = {}

    def forward(unet, noisy, timesteps, cond):
        seen["noisy"] = noisy
        return torch.zeros_like(noisy) if predict is None else predict

    acc = SimpleNamespace(process_index=0, autocast=contextlib.nullcontext)
    run = SimpleNamespace(config=cfg, noise_scheduler=DDPMScheduler(num_train_timesteps=1000), prediction_type="epsilon",
                          device=torch.device("cpu"), weight_dtype=torch.float32, accelerator=acc, unet=None,
                          family=SimpleNamespace(unet_forward=forward))
    return run, seen


class _Cond:
    def to(self, *a, **k):
        return self


def test_input_perturbation_noises_the_input_but_keeps_the_target():
    cfg = _cfg(ip_noise_gamma=0.1)
    base = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    perturbed = noise.input_noise(cfg, base, torch.Generator().manual_seed(5))
    extra = torch.randn(base.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(perturbed, base + 0.1 * extra)
    assert noise.input_noise(_cfg(), base, torch.Generator()) is None

    run, seen = _stub_run(cfg)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    err = denoising_error(run, None, latents, base, t, _Cond(), perturbed)
    torch.testing.assert_close(seen["noisy"], run.noise_scheduler.add_noise(latents, perturbed, t))
    torch.testing.assert_close(err, base ** 2)  # a zero prediction against the unperturbed noise


# noise --------------------------------------------------------------------------------------------------------------

def test_pyramid_noise_shape_statistics_and_seeding():
    cfg = _cfg(multires_noise_iterations=6, multires_noise_discount=0.4)
    shape = (32, 4, 32, 32)
    a = noise.draw_noise(cfg, shape, torch.Generator().manual_seed(7))
    b = noise.draw_noise(cfg, shape, torch.Generator().manual_seed(7))
    c = noise.draw_noise(cfg, shape, torch.Generator().manual_seed(8))
    white = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert a.shape == shape and torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() - 1) < 1e-5
    # low frequencies: each image's mean varies several times more than white noise's (1/32 for 32x32)
    assert a.mean(dim=(2, 3)).std().item() > 2 * white.mean(dim=(2, 3)).std().item()
    # off: exactly the plain draw
    assert torch.equal(noise.draw_noise(_cfg(), shape, torch.Generator().manual_seed(7)), white)


def test_zero_terminal_snr_in_training_and_preview_schedulers(tmp_path, demo_dataset):
    from sdlora.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "out", demo_dataset, steps=1, rank=2, zero_terminal_snr=True,
                      prediction_type="v_prediction")
    trainer = Trainer(cfg)
    trainer.prepare()
    assert float(trainer.noise_scheduler.alphas_cumprod[-1]) == 0.0
    assert float(trainer.base.noise_scheduler.alphas_cumprod[-1]) > 0  # the (shareable) base model is not changed
    ddim = trainer.base.make_pipeline("ddim", scheduler_config=trainer.noise_scheduler.config).scheduler
    assert float(ddim.alphas_cumprod[-1]) == 0.0
    euler = trainer.base.make_pipeline(scheduler_config=trainer.noise_scheduler.config).scheduler
    torch.testing.assert_close(euler.betas, trainer.noise_scheduler.betas)
    # builtin:tiny predicts epsilon unless told otherwise: refused once the model says so
    auto = SimpleNamespace(config=_cfg(zero_terminal_snr=True), family=trainer.family, base=trainer.base,
                           prediction_type="epsilon")
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction model"):
        noise.check_objective(auto)


# max-norm regularisation --------------------------------------------------------------------------------------------

def _lora_model():
    from peft import LoraConfig, inject_adapter_in_model

    from sdlora.adapters.spec import ADAPTER_NAME

    model = torch.nn.Sequential()
    model.add_module("big", torch.nn.Linear(16, 16))
    model.add_module("small", torch.nn.Linear(16, 16))
    model.add_module("conv", torch.nn.Conv2d(4, 8, 3))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["big", "small", "conv"]), model,
                            adapter_name=ADAPTER_NAME)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, scale in (("big", 1.0), ("small", 0.001), ("conv", 1.0)):
            layer = getattr(model, name)
            for part in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                part.weight.copy_(torch.randn(part.weight.shape, generator=gen) * scale)
    return model


def _norm(layer):
    from sdlora.adapters.spec import ADAPTER_NAME

    up, down = layer.lora_B[ADAPTER_NAME].weight, layer.lora_A[ADAPTER_NAME].weight
    return ((up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * layer.scaling[ADAPTER_NAME]).norm().item()


def test_scale_weight_norms_clamps_each_module_and_counts_them():
    model = _lora_model()
    small_before = _norm(model.small)
    assert _norm(model.big) > 1 and _norm(model.conv) > 1 and small_before < 0.5
    stats = apply_max_norm([model], 1.0)
    assert stats.keys_scaled == 2
    assert _norm(model.big) == pytest.approx(1.0, rel=1e-5) and _norm(model.conv) == pytest.approx(1.0, rel=1e-5)
    assert _norm(model.small) == small_before  # under the limit: untouched
    assert stats.max_norm == pytest.approx(1.0, rel=1e-5)
    assert stats.average_norm == pytest.approx((2 + small_before) / 3, rel=1e-5)
    assert apply_max_norm([model], 1.0).keys_scaled == 0  # already within


# caption tag dropout ------------------------------------------------------------------------------------------------

def test_caption_tag_dropout_drops_at_the_rate_and_keeps_the_first_tags():
    caption = ", ".join(f"tag{i}" for i in range(12))
    rng = random.Random(0)
    kept = dropped = 0
    for _ in range(2000):
        tags = build_caption(caption, trigger_word="sks", keep_tokens=2, tag_dropout=0.25, rng=rng).split(", ")
        assert tags[:3] == ["sks", "tag0", "tag1"]
        kept += len(tags) - 3
        dropped += 10 - (len(tags) - 3)
    assert dropped / (kept + dropped) == pytest.approx(0.25, abs=0.02)
    same = [build_caption(caption, keep_tokens=2, tag_dropout=0.25, rng=random.Random(9)) for _ in range(2)]
    assert same[0] == same[1]
    assert build_caption(caption, rng=random.Random(1), tag_dropout=0.0) == caption


def test_caption_tag_dropout_reaches_the_training_captions(tmp_path, demo_dataset):
    from sdlora.data.plan import build_training_data

    cfg = tiny_config(tmp_path / "o", demo_dataset, caption_tag_dropout_rate=0.5, keep_tokens=1, seed=3)
    ds = build_training_data(cfg).dataset
    assert ds.subsets[0].tag_dropout == 0.5 and ds.captions_vary
    captions = [ds.caption_for(epoch, i) for epoch in range(4) for i in range(len(ds))]
    again = build_training_data(cfg).dataset
    assert captions == [again.caption_for(epoch, i) for epoch in range(4) for i in range(len(ds))]
    fixed = {ds.fixed_caption(i) for i in range(len(ds.items))}
    assert any(c not in fixed for c in captions)


def test_dataset_toml_subsets_take_their_own_tag_dropout(tmp_path, demo_dataset):
    from sdlora.data.dataset_config import DatasetConfigError
    from sdlora.data.plan import build_training_data

    images = next(p for p in sorted(demo_dataset.rglob("*")) if p.is_dir() and any(p.glob("*.png")))
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{images.as_posix()}"\n'
                    "caption_tag_dropout_rate = 0.4\n")
    cfg = make_config(base_model="builtin:tiny", dataset_config=str(toml), output_dir=str(tmp_path / "o"),
                      resolution=64, caption_tag_dropout_rate=0.1)
    assert build_training_data(cfg).dataset.subsets[0].tag_dropout == 0.4
    toml.write_text(toml.read_text().replace("0.4", "1.5"))
    with pytest.raises(DatasetConfigError, match="caption_tag_dropout_rate"):
        build_training_data(cfg)


# settings -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"clip_skip": 0}, "clip_skip"),
    ({"min_timestep": -1}, "min_timestep"),
    ({"max_timestep": 1001}, "max_timestep"),
    ({"min_timestep": 500, "max_timestep": 500}, "min_timestep .500. must be below max_timestep"),
    ({"loss_type": "l1"}, "loss_type"),
    ({"huber_c": 0}, "huber_c"),
    ({"huber_schedule": "linear"}, "huber_schedule"),
    ({"multires_noise_iterations": -1}, "multires_noise_iterations"),
    ({"multires_noise_discount": 0}, "multires_noise_discount"),
    ({"ip_noise_gamma": -0.1}, "ip_noise_gamma"),
    ({"scale_weight_norms": 0}, "scale_weight_norms"),
    ({"caption_tag_dropout_rate": 1.0}, "caption_tag_dropout_rate"),
    ({"zero_terminal_snr": True, "prediction_type": "epsilon"}, "zero_terminal_snr needs a v-prediction model"),
    ({"noise_offset": 0.05, "multires_noise_iterations": 6}, "noise_offset and multires_noise_iterations"),
    ({"scale_weight_norms": 1.0, "network": "loha"}, "scale_weight_norms works on plain LoRA"),
    ({"scale_weight_norms": 1.0, "dora": True}, "scale_weight_norms works on plain LoRA"),
])
def test_bad_values_and_combinations_are_refused_with_a_sentence(values, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**values)


def test_each_option_has_a_cli_flag():
    from sdlora.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "train", "--data", "builtin:demo", "--clip-skip", "2", "--min-timestep", "10", "--max-timestep", "900",
        "--loss-type", "smooth_l1", "--huber-c", "0.2", "--huber-schedule", "exponential",
        "--multires-noise-iterations", "6", "--multires-noise-discount", "0.4", "--ip-noise-gamma", "0.05",
        "--zero-terminal-snr", "--prediction-type", "v_prediction", "--debiased-estimation-loss",
        "--scale-weight-norms", "1.5", "--caption-tag-dropout-rate", "0.1"])
    cfg = config_from_args(args)
    assert (cfg.clip_skip, cfg.min_timestep, cfg.max_timestep, cfg.loss_type, cfg.huber_c, cfg.huber_schedule) == (
        2, 10, 900, "smooth_l1", 0.2, "exponential")
    assert (cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.ip_noise_gamma, cfg.zero_terminal_snr,
            cfg.debiased_estimation_loss, cfg.scale_weight_norms, cfg.caption_tag_dropout_rate) == (
        6, 0.4, 0.05, True, True, 1.5, 0.1)


def test_defaults_write_no_new_metadata():
    from sdlora.formats.export import objective_metadata

    assert objective_metadata(_cfg()) == {}


def test_metadata_carries_kohyas_keys_and_values(tmp_path, demo_dataset):
    from sdlora.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "out", demo_dataset, steps=2, rank=2, clip_skip=2, min_timestep=100, max_timestep=900,
                      loss_type="huber", huber_c=0.2, huber_schedule="exponential", multires_noise_iterations=4,
                      multires_noise_discount=0.5, ip_noise_gamma=0.1, zero_terminal_snr=True,
                      prediction_type="v_prediction", debiased_estimation_loss=True, scale_weight_norms=0.001,
                      caption_tag_dropout_rate=0.3)
    trainer = Trainer(cfg)
    trainer.prepare()
    result = trainer.run()
    with safe_open(str(result.lora_path), "pt") as f:
        md = f.metadata()
    assert {k: md[k] for k in KOHYA_KEYS} == {
        "ss_clip_skip": "2", "ss_min_timestep": "100", "ss_max_timestep": "900", "ss_loss_type": "huber",
        "ss_huber_schedule": "exponential", "ss_huber_c": "0.2", "ss_multires_noise_iterations": "4",
        "ss_multires_noise_discount": "0.5", "ss_ip_noise_gamma": "0.1", "ss_zero_terminal_snr": "True",
        "ss_debiased_estimation": "True", "ss_scale_weight_norms": "0.001", "ss_caption_tag_dropout_rate": "0.3"}
    import json

    steps = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    # a limit this low scales every module, and the step log says so as kohya's does
    assert all(s["keys_scaled"] > 0 and s["max_key_norm"] == pytest.approx(0.001, rel=1e-3) for s in steps)
    assert all(s["average_key_norm"] <= s["max_key_norm"] for s in steps)


def test_presets_and_the_training_form_carry_the_options(tmp_path):
    from sdlora.config.train_config import TrainConfig, config_from_preset, save_preset
    from sdlora.ui.fields import config_to_form, form_to_config

    preset = tmp_path / "p.toml"
    preset.write_text('base_model = "builtin:tiny"\ndata_dir = "builtin:demo"\n[training]\nclip_skip = 2\n'
                      'loss_type = "smooth_l1"\nhuber_schedule = "constant"\nmin_timestep = 50\n'
                      'scale_weight_norms = 1.0\n[captions]\ncaption_tag_dropout_rate = 0.2\n')
    cfg = config_from_preset(preset)
    assert (cfg.clip_skip, cfg.loss_type, cfg.huber_schedule, cfg.min_timestep, cfg.scale_weight_norms,
            cfg.caption_tag_dropout_rate) == (2, "smooth_l1", "constant", 50, 1.0, 0.2)
    assert config_from_preset(save_preset(cfg, tmp_path / "again.toml")) == cfg
    # the form shows unset values as numbers (0, 1000, 0) and turns them back into unset
    form = config_to_form(TrainConfig(base_model="builtin:tiny", data_dir="builtin:demo").model_dump())
    assert (form["min_timestep"], form["max_timestep"], form["scale_weight_norms"]) == (0, 1000, 0)
    back = form_to_config(dict(form, clip_skip=2.0, huber_c="0.3"))
    assert (back["min_timestep"], back["max_timestep"], back["scale_weight_norms"]) == (None, None, None)
    assert (back["clip_skip"], back["huber_c"]) == (2, 0.3)
    assert form_to_config(dict(form, max_timestep=800))["max_timestep"] == 800
