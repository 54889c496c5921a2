"""Several subsets, kohya's dataset TOML, regularization images, the step plan, LoRA+ and the kohya_ss JSON import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, subprocess_env
from sdlora.config.train_config import ConfigError, config_from_preset, make_config
from sdlora.data.scan import DatasetError
from sdlora.data.plan import build_training_data, make_step_plan
from sdlora.data.entries import balance_reg_repeats


def _images(folder: Path, n: int, *, size=(64, 64), caption: str | None = "a thing", ext=".txt", color=(200, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, color).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}{ext}").write_text(f"{caption} {i}, tag a, tag b, tag c")
    return folder


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def kohya_layout(tmp_path):
    """Two train subsets (one wide, for buckets) and one reg subset, as a kohya dataset TOML."""
    _images(tmp_path / "char", 3, ext=".cap")
    _images(tmp_path / "style", 2, size=(96, 48), caption=None)
    _images(tmp_path / "reg", 4, caption=None, color=(20, 20, 200))
    toml = _toml(tmp_path / "dataset.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'char'}"
  num_repeats = 5
  caption_extension = ".cap"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'style'}"
  num_repeats = 3
  class_tokens = "wide style"
  keep_tokens = 0
  shuffle_caption = false
  color_aug = false

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'reg'}"
  is_reg = true
  class_tokens = "thing"
  num_repeats = 1
""")
    return tmp_path, toml


# dataset TOML -------------------------------------------------------------------------------------------------

def test_dataset_toml_subset_options_take_effect(kohya_layout):
    root, toml = kohya_layout
    cfg = make_config(dataset_config=str(toml), resolution=512, batch_size=8, trigger_word="sks", steps=10)
    data = build_training_data(cfg)
    ds = data.dataset
    by_name = {s.name: s for s in ds.subsets}
    assert set(by_name) == {"char", "style", "reg"}
    char, style, reg = by_name["char"], by_name["style"], by_name["reg"]
    # inherited from [general] unless the subset sets it
    assert (char.shuffle_tags, char.keep_tokens, char.flip) == (True, 1, True)
    assert (style.shuffle_tags, style.keep_tokens, style.flip) == (False, 0, False)
    assert reg.is_reg and not char.is_reg and reg.trigger_word == "" and char.trigger_word == "sks"
    counts = Counter(ds.subset_of(i).name for i in range(len(ds)))
    assert counts["char"] == 15 and counts["style"] == 6  # num_repeats from the TOML
    assert counts["reg"] == 21  # balanced to the 21 train samples, as kohya does
    # caption_extension per subset: char reads .cap files; style has none and takes its class_tokens
    char_i = next(i for i in range(len(ds)) if ds.subset_of(i).name == "char")
    style_i = next(i for i in range(len(ds)) if ds.subset_of(i).name == "style")
    assert ds.fixed_caption(ds.entries[char_i].item_index).startswith("sks, a thing")
    assert ds.caption_for(0, style_i) == "sks, wide style"
    assert ds.caption_for(0, next(i for i in range(len(ds)) if ds.entries[i].is_reg)) == "thing"
    # flip only where flip_aug is on; the dataset's resolution (64), not the config's 512, with buckets
    assert any(ds.flip_for(0, char_i + k) for k in range(15)) and not any(ds.flip_for(e, style_i) for e in range(20))
    assert ds.entries[style_i].size != (64, 64) and ds.entries[char_i].size == (64, 64)
    assert ds.groups[0].batch_size == 2
    assert "color_aug" in data.summary()  # named as an unsupported kohya key at its default


@pytest.mark.parametrize("body, words", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nnum_repeat = 3\n', ["num_repeat", "does not know"]),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\ncolor_aug = true\n', ["color_aug", "does not support"]),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}/missing"\n', ["image_dir", "not a folder"]),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nis_reg = true\n', ["is_reg", "training images"]),
    ('[[datasets]]\nresolution = [64, 128]\n[[datasets.subsets]]\nimage_dir = "{d}"\n', ["resolution"]),
    ('[general]\nbatchsize = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\n', ["[general]", "batchsize"]),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{empty}"\n', ["image_dir", "No usable images"]),
])
def test_dataset_toml_errors_name_file_and_key(tmp_path, body, words):
    d = _images(tmp_path / "imgs", 1)
    (tmp_path / "empty").mkdir()
    toml = _toml(tmp_path / "bad.toml", body.format(d=d, empty=tmp_path / "empty"))
    cfg = make_config(dataset_config=str(toml), resolution=64, steps=2)
    with pytest.raises((DatasetError, ConfigError)) as err:
        build_training_data(cfg)
    msg = str(err.value)
    assert "bad.toml" in msg and all(w in msg for w in words), msg
    assert "\n" not in msg


def test_data_dir_and_dataset_config_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="dataset_config"):
        make_config(data_dir=str(tmp_path), dataset_config=str(tmp_path / "x.toml"))


def test_dataset_config_in_a_preset(tmp_path, kohya_layout):
    _, toml = kohya_layout
    preset = _toml(tmp_path / "p.toml", f'dataset_config = "{toml}"\nprior_loss_weight = 0.5\nresolution = 64\nsteps = 4\n')
    cfg = config_from_preset(preset)
    assert cfg.dataset_config == str(toml) and cfg.prior_loss_weight == 0.5


# regularization -------------------------------------------------------------------------------------------------

def test_reg_balancing_follows_kohya():
    assert balance_reg_repeats(10, [1, 1, 1]) == [4, 3, 3]  # short: extra rounds add one repeat each, in order
    assert balance_reg_repeats(4, [1] * 6) == [1, 1, 1, 1, 0, 0]  # too many: the rest is unused
    assert balance_reg_repeats(5, [3, 3]) == [3, 3]  # first round registers whole repeats (overshoot allowed)
    assert balance_reg_repeats(0, [1]) == [0] and balance_reg_repeats(7, []) == []


def test_reg_data_dir_folder_mode(tmp_path):
    _images(tmp_path / "train" / "10_sks dog", 3)
    _images(tmp_path / "reg" / "1_dog", 5, caption=None)
    _images(tmp_path / "reg" / "2_animal", 4, caption=None)
    cfg = make_config(data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), resolution=64, steps=5)
    data = build_training_data(cfg)
    ds = data.dataset
    assert ds.num_train_samples == 30 and data.num_reg_images == 5 * 1 + 4 * 2 and ds.num_reg_samples == 30
    reg = [i for i in range(len(ds)) if ds.entries[i].is_reg]
    assert {ds.caption_for(0, i) for i in reg} == {"dog", "animal"}  # class tokens from the N_class folder names
    assert data.dataset_dirs(reg=True) == {"1_dog": {"n_repeats": 1, "img_count": 5}, "2_animal": {"n_repeats": 2, "img_count": 4}}
    assert data.dataset_dirs(reg=False) == {"10_sks dog": {"n_repeats": 10, "img_count": 3}}


def test_reg_folder_errors(tmp_path):
    _images(tmp_path / "train", 2)
    (tmp_path / "reg").mkdir()
    _images(tmp_path / "reg" / "plain", 2)  # not N_class
    cfg = make_config(data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), resolution=64, steps=5)
    with pytest.raises(DatasetError, match="reg_data_dir.*N_class"):
        build_training_data(cfg)
    cfg = make_config(data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "nope"), resolution=64, steps=5)
    with pytest.raises(DatasetError, match="reg_data_dir: .*nope.* is not a folder"):
        build_training_data(cfg)


# step plan ------------------------------------------------------------------------------------------------------

def _simulate(cfg, ds, num_processes):
    """Run the loop's own index function for every process: (steps, samples seen per epoch per process)."""
    from sdlora.training.trainer import Trainer

    plan = make_step_plan(cfg, ds, num_processes)
    seen = []
    for p in range(num_processes):
        t = Trainer(cfg)
        t.dataset, t.steps_per_epoch, t.total_steps = ds, plan.steps_per_epoch, plan.total_steps
        t.accelerator = type("Acc", (), {"process_index": p, "num_processes": num_processes})()
        t.epoch_batches = {}
        batches = [t._indices(step, m)[1] for step in range(plan.steps_per_epoch) for m in range(cfg.grad_accum)]
        seen.append(batches)
    return plan, seen


@pytest.mark.parametrize("batch_size, grad_accum, procs", [(2, 1, 1), (2, 2, 1), (3, 2, 2), (1, 3, 2), (4, 1, 3)])
def test_step_plan_matches_the_batches_the_loop_reads(kohya_layout, batch_size, grad_accum, procs):
    _, toml = kohya_layout
    # batch_size from the TOML's dataset (2) for buckets; the config's batch size when the dataset leaves it out
    text = toml.read_text().replace("batch_size = 2\n", "" if batch_size != 2 else "batch_size = 2\n")
    toml.write_text(text)
    cfg = make_config(dataset_config=str(toml), resolution=64, batch_size=batch_size, grad_accum=grad_accum, epochs=2)
    ds = build_training_data(cfg).dataset
    plan, seen = _simulate(cfg, ds, procs)
    epoch_batches = [ds.batches_for_epoch(0, batch_size, process_index=p, num_processes=procs) for p in range(procs)]
    per_process = len(epoch_batches[0])
    assert plan.total_steps == 2 * plan.steps_per_epoch == 2 * math.ceil(per_process / grad_accum)
    # every batch of the epoch is read once in an epoch's steps (the last accumulation may wrap to the start)
    for p in range(procs):
        assert {tuple(b) for b in seen[p]} == {tuple(b) for b in epoch_batches[p]}
    # no batch is lost except the ones that do not divide over the processes
    assert plan.batches_per_epoch - per_process * procs < procs
    assert f"{plan.total_steps} steps" in plan.describe()


# a real run: reg samples in the loss, LoRA+, metadata, the plan on stderr ------------------------------------------

def test_run_with_reg_images_loraplus_and_kohya_metadata(tmp_path, kohya_layout):
    from sdlora.formats.lora_file import read_lora
    from sdlora.training.trainer import Trainer

    _, toml = kohya_layout
    cfg = make_config(base_model="builtin:tiny", dataset_config=str(toml), output_dir=str(tmp_path / "out"), rank=4,
                      resolution=64, steps=6, grad_accum=2, lr=1e-3, loraplus_lr_ratio=16, prior_loss_weight=0.25,
                      save_precision="fp32", seed=3)
    events = []
    trainer = Trainer(cfg, on_event=events.append)
    trainer.prepare()
    # LoRA+: up (lora_B) at lr x 16, down at lr
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-3, 16e-3]
    up_group = next(g for g in trainer.optimizer.param_groups if g["lr"] == 16e-3)
    names = {id(p): n for n, p in trainer.base.unet.named_parameters()}
    assert up_group["params"] and all("lora_B" in names[id(p)] for p in up_group["params"])
    # samples per step: train and reg both reach the loop, and reg ones carry prior_loss_weight
    kinds, read = Counter(), set()
    for step in range(trainer.steps_per_epoch):
        for micro in range(cfg.grad_accum):
            _, idx = trainer._indices(step, micro)
            if tuple(idx) in read:  # the epoch's last accumulation wraps round to its first batches
                continue
            read.add(tuple(idx))
            kinds.update("reg" if trainer.dataset.entries[i].is_reg else "train" for i in idx)
            w = trainer._loss_weights(step, micro)
            assert w.tolist() == [0.25 if trainer.dataset.entries[i].is_reg else 1.0 for i in idx]
    assert kinds["train"] == 21 and kinds["reg"] == 21  # one epoch: every sample once (batch 2, accumulation 2)
    # the weight really scales the loss: a micro-batch of reg samples at weight w gives w x the unweighted loss
    reg_step = next((s, m) for s in range(trainer.steps_per_epoch) for m in range(2)
                    if all(trainer.dataset.entries[i].is_reg for i in trainer._indices(s, m)[1]))
    latents, cond = trainer._next_batch(*reg_step)
    with torch.no_grad():
        plain = trainer._loss(latents, cond, *reg_step)
        weighted = trainer._loss(latents, cond, *reg_step, trainer._loss_weights(*reg_step))
    assert torch.allclose(weighted, plain * 0.25)
    result = trainer.run()
    assert result.steps == trainer.plan.total_steps == 6
    plan_msgs = [e.data["message"] for e in events if e.kind == "status" and "Step plan" in e.data.get("message", "")]
    assert plan_msgs and "21 samples + 21 reg samples" in plan_msgs[0]
    _, md = read_lora(result.lora_path)
    assert md["ss_num_reg_images"] == "4" and md["ss_prior_loss_weight"] == "0.25" and md["ss_loraplus_lr_ratio"] == "16.0"
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(md["ss_dataset_dirs"]) == {"char": {"n_repeats": 5, "img_count": 3}, "style": {"n_repeats": 3, "img_count": 2}}
    datasets = json.loads(md["ss_datasets"])
    assert datasets[0]["num_train_images"] == 21 and datasets[0]["batch_size_per_device"] == 2
    assert {s["image_dir"]: s["is_reg"] for s in datasets[0]["subsets"]} == {"char": False, "style": False, "reg": True}
    assert md["ss_num_train_images"] == "21"


def test_cli_prints_the_plan_before_the_first_step(tmp_path, demo_dataset):
    cmd = [sys.executable, "-m", "sdlora", "train", "--base-model", "builtin:tiny", "--data", str(demo_dataset),
           "--output", str(tmp_path / "o"), "--epochs", "1", "--rank", "2", "--resolution", "64", "--batch-size", "4",
           "--grad-accum", "2", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 6 images x 10 repeats = 60 samples -> 15 batches of 4 / accumulation 2 = 8 steps per epoch
    assert "6 images x repeats = 60 samples -> 15 batches of up to 4 / accumulation 2 = 8 steps per epoch; 1 epochs = 8 steps" \
        in proc.stderr
    log = (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 8


# kohya_ss GUI JSON ----------------------------------------------------------------------------------------------

KOHYA_SS_JSON = {
    "LoRA_type": "Kohya LoCon", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "",
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": False,
    "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": "1",
    "color_aug": False, "conv_alpha": 1, "conv_dim": 4, "dataset_config": "", "enable_bucket": True, "epoch": 8,
    "flip_aug": True, "full_fp16": False, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
    "keep_tokens": "1", "learning_rate": 0.0001, "logging_dir": "", "loraplus_lr_ratio": 16, "lr_scheduler": "cosine",
    "lr_scheduler_num_cycles": "", "lr_scheduler_power": "", "lr_warmup": 10, "max_bucket_reso": 2048,
    "max_data_loader_n_workers": "0", "max_resolution": "768,768", "max_timestep": 1000, "max_token_length": "75",
    "max_train_epochs": "", "max_train_steps": "1600", "mem_eff_attn": False, "min_bucket_reso": 256, "min_snr_gamma": 5,
    "mixed_precision": "bf16", "model_list": "custom", "multires_noise_iterations": 0, "network_alpha": 8,
    "network_dim": 16, "network_dropout": 0, "network_train_unet_only": False, "noise_offset": 0.0357,
    "noise_offset_type": "Original", "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.05 betas=0.9,0.99",
    "output_dir": "/data/out", "output_name": "my_char", "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/v1-5-pruned.safetensors", "prior_loss_weight": 0.8, "random_crop": False,
    "reg_data_dir": "/data/reg", "resume": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 200,
    "sample_prompts": "sks person, portrait --n blurry --w 512 --h 512\n# comment\nsks person, full body\n",
    "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_every_n_steps": 400, "save_model_as": "safetensors",
    "save_precision": "fp16", "save_state": False, "scale_weight_norms": 0, "sdxl": False, "seed": "1234",
    "shuffle_caption": True, "stop_text_encoder_training": 0, "text_encoder_lr": 5e-05, "train_batch_size": 2,
    "train_data_dir": "/data/img", "training_comment": "", "unet_lr": 0.0002, "use_wandb": False, "v2": False,
    "v_parameterization": False, "xformers": "xformers",
}


def test_import_kohya_ss_json(tmp_path):
    from sdlora.config.kohya_import import import_kohya_json

    src = tmp_path / "kohya.json"
    src.write_text(json.dumps(KOHYA_SS_JSON, indent=2))
    result = import_kohya_json(src)
    cfg = result.config
    expected = dict(base_model="/models/v1-5-pruned.safetensors", data_dir="/data/img", reg_data_dir="/data/reg",
                    output_dir="/data/out", output_name="my_char", rank=16, alpha=8.0, conv_rank=4, conv_alpha=1.0,
                    lr=2e-4, train_text_encoder=True, text_encoder_lr=5e-5, loraplus_lr_ratio=16.0, lr_scheduler="cosine",
                    steps=1600, epochs=None, warmup_steps=160, batch_size=2, grad_accum=2, optimizer="adamw8bit",
                    weight_decay=0.05, mixed_precision="bf16", save_precision="fp16", seed=1234, cache_latents=True,
                    gradient_checkpointing=True, shuffle_tags=True, random_flip=True, enable_buckets=True,
                    bucket_no_upscale=True, center_crop=True, keep_tokens=1, caption_dropout=0.05, min_snr_gamma=5.0,
                    noise_offset=0.0357, prior_loss_weight=0.8, resolution=768, sample_every=200, save_every=400,
                    sample_prompts=["sks person, portrait --n blurry --w 512 --h 512", "sks person, full body"],
                    num_workers=0, prediction_type="auto")
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert "xformers" in result.not_carried and "sample_sampler" in result.not_carried
    assert "save_every_n_epochs" in result.not_carried and "min_bucket_reso" in result.not_carried
    assert "optimizer_args (rest)" in result.not_carried and "color_aug" in result.at_default
    report = "\n".join(result.report_lines())
    assert "network_dim -> rank" in report and "xformers" in report
    # every key of the file is either carried or named as not carried
    named = set(result.carried) | set(result.not_carried) | set(result.at_default)
    assert set(KOHYA_SS_JSON) - named <= {"v2", "sdxl", "model_list", "noise_offset_type"}


def test_import_kohya_carries_the_loss_noise_and_clip_skip_keys(tmp_path):
    from sdlora.config.kohya_import import import_kohya_json

    src = tmp_path / "kohya.json"
    options = {"clip_skip": 2, "min_timestep": 100, "max_timestep": 900, "loss_type": "huber", "huber_c": 0.2,
               "huber_schedule": "exponential", "ip_noise_gamma": 0.05, "zero_terminal_snr": True,
               "v_parameterization": True, "debiased_estimation_loss": True, "scale_weight_norms": 1.5,
               "caption_tag_dropout_rate": 0.1, "noise_offset_type": "Multires", "multires_noise_iterations": 6,
               "multires_noise_discount": 0.4}
    src.write_text(json.dumps(dict(KOHYA_SS_JSON, **options)))
    result = import_kohya_json(src)
    cfg = result.config
    expected = dict(clip_skip=2, min_timestep=100, max_timestep=900, loss_type="huber", huber_c=0.2,
                    huber_schedule="exponential", ip_noise_gamma=0.05, zero_terminal_snr=True,
                    debiased_estimation_loss=True, scale_weight_norms=1.5, caption_tag_dropout_rate=0.1,
                    multires_noise_iterations=6, multires_noise_discount=0.4, noise_offset=0.0)
    assert {k: getattr(cfg, k) for k in expected} == expected
    for key in set(options) - {"noise_offset_type", "v_parameterization"}:
        assert result.carried[key] == key, key
    assert "not used" in result.carried["noise_offset"]  # the GUI keeps it, but trains with the pyramid noise
    # kohya's GUI defaults (0, 1000, 0 = off) keep sdlora's defaults
    src.write_text(json.dumps(KOHYA_SS_JSON))
    cfg = import_kohya_json(src).config
    assert (cfg.clip_skip, cfg.min_timestep, cfg.max_timestep, cfg.multires_noise_iterations, cfg.scale_weight_norms,
            cfg.noise_offset) == (1, None, None, 0, None, 0.0357)
    src.write_text(json.dumps(dict(KOHYA_SS_JSON, loss_type="l1")))
    assert "loss_type" in import_kohya_json(src).not_carried  # a loss sdlora does not offer is reported, not guessed


def test_import_kohya_cli_writes_a_loadable_preset(tmp_path):
    src = tmp_path / "k.json"
    data = dict(KOHYA_SS_JSON, max_train_steps="", epoch=3, network_train_unet_only=True, LoRA_type="Standard",
                v_parameterization=True, save_precision="float")
    src.write_text(json.dumps(data))
    out = tmp_path / "presets" / "x.toml"
    proc = subprocess.run([sys.executable, "-m", "sdlora", "import-kohya", str(src), "--out", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Not carried over" in proc.stderr and "xformers" in proc.stderr and "lr_warmup" in proc.stderr
    cfg = config_from_preset(out)
    assert (cfg.epochs, cfg.steps, cfg.train_text_encoder, cfg.conv_rank) == (3, None, False, 0)
    assert (cfg.prediction_type, cfg.save_precision, cfg.text_encoder_lr) == ("v_prediction", "fp32", None)


def test_import_kohya_bad_values_name_the_key(tmp_path):
    from sdlora.config.kohya_import import KohyaImportError, import_kohya_json

    src = tmp_path / "k.json"
    src.write_text(json.dumps(dict(KOHYA_SS_JSON, network_dim="sixteen")))
    with pytest.raises(KohyaImportError, match="k.json.*network_dim"):
        import_kohya_json(src)
    src.write_text(json.dumps(dict(KOHYA_SS_JSON, network_dim=0)))
    with pytest.raises(KohyaImportError, match="network_dim.*rank"):
        import_kohya_json(src)
    src.write_text("{not json")
    with pytest.raises(KohyaImportError, match="not valid JSON"):
        import_kohya_json(src)
