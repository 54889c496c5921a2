"""Base-model loading: builtin:tiny, diffusers folders, single-file checkpoints in the original layout, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers_ldm import pipeline_to_ldm, unet_to_ldm
from sdlora.model_configs import MODEL_CONFIGS, clip_vocab_and_merges, write_config_folder
from sdlora.models import (ModelLoadError, build_tiny_model, detect_architecture, load_base_model, resolve_model_spec,
                           tiny_model_dir)


def _probe(base):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    img = torch.randn(1, 3, 64, 64, generator=g)
    ids = base.tokenizer(["a red circle on a blue background"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = base.text_encoder(ids)[0]
        return {"te": hidden, "unet": base.unet(x, torch.tensor([10]), hidden).sample,
                "enc": base.vae.encode(img).latent_dist.mean, "dec": base.vae.decode(x).sample}


def _assert_same(a, b, tol=1e-5):
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


def test_builtin_tiny_loads_and_generates():
    base = load_base_model("builtin:tiny")
    assert (base.family, base.prediction_type, base.default_resolution, base.kind) == ("sd1", "epsilon", 64, "builtin")
    with torch.no_grad():
        latents = base.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    ids = base.tokenizer("sdlora_mascot, a red circle").input_ids
    assert ids[0] == base.tokenizer.bos_token_id and ids[-1] == base.tokenizer.eos_token_id
    assert base.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "sdlora_mascot,aredcircle"
    pipe = base.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_tiny_build_is_deterministic(tmp_path):
    a, b = build_tiny_model(tmp_path / "a"), build_tiny_model(tmp_path / "b")
    for part in ("unet", "vae", "text_encoder"):
        fa = next((a / part).glob("*.safetensors")).read_bytes()
        fb = next((b / part).glob("*.safetensors")).read_bytes()
        assert fa == fb, part
    assert (a / "tokenizer" / "vocab.json").read_text() == (b / "tokenizer" / "vocab.json").read_text()


def test_diffusers_folder(tmp_path):
    base = load_base_model("builtin:tiny")
    base.make_pipeline().save_pretrained(tmp_path / "folder")
    loaded = load_base_model(str(tmp_path / "folder"))
    assert loaded.kind == "folder" and loaded.family == "sd1"
    _assert_same(_probe(base), _probe(loaded), 0)


def test_single_file_in_original_layout(tmp_path):
    base = load_base_model("builtin:tiny")
    sd = pipeline_to_ldm(base)
    path = tmp_path / "tiny-model.safetensors"
    save_file(sd, path)
    loaded = load_base_model(str(path))
    assert loaded.kind == "single_file" and loaded.family == "sd1" and loaded.name == "tiny-model"
    _assert_same(_probe(base), _probe(loaded))
    # .ckpt the way old checkpoints ship ({"state_dict": ...}), read with weights_only
    ckpt = tmp_path / "tiny-model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, ckpt)
    _assert_same(_probe(base), _probe(load_base_model(str(ckpt))))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_pickled_objects_need_explicit_opt_in(tmp_path):
    base = load_base_model("builtin:tiny")
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(base), "payload": _Evil()}, ckpt, pickle_protocol=2)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_base_model(str(ckpt))
    loaded = load_base_model(str(ckpt), allow_pickle=True)
    _assert_same(_probe(base), _probe(loaded))


def test_shipped_sd15_and_sd2_configs_match_the_real_architectures(tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = write_config_folder("sd15", tmp_path / "sd15")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in MODEL_CONFIGS["sd15"]["text_encoder"].items() if k != "architectures"}))
        unet2 = UNet2DConditionModel.from_config(MODEL_CONFIGS["sd2-v"]["unet"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5
    assert round(sum(p.numel() for p in te.parameters()) / 1e6, 1) == 123.1
    assert unet2.config.cross_attention_dim == 1024 and unet2.config.use_linear_projection
    # An SD1.5-layout state dict (shapes only) is recognised and diffusers' converter maps it onto this config exactly.
    ldm = unet_to_ldm(unet)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert detect_architecture(shapes, Path("v1-5.safetensors")) == "sd15"
    converted = convert_ldm_unet_checkpoint(ldm, cfg)
    assert set(converted) == set(unet.state_dict())
    sd2_shapes = dict(shapes, **{"cond_stage_model.model.text_projection": (1024, 1024)})
    assert detect_architecture(sd2_shapes, Path("v2-1_768.safetensors")) == "sd2"


def test_clip_tokenizer_from_vendored_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    folder = write_config_folder("sd15", tmp_path / "sd15")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    sd2 = CLIPTokenizer.from_pretrained(write_config_folder("sd2-v", tmp_path / "sd2") / "tokenizer")
    assert sd2.pad_token == "!" and tok.pad_token == "<|endoftext|>"


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_spec(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_base_model("./models/nothing-here")
    notckpt = tmp_path / "notes.safetensors"
    notckpt.write_text("hello, I am a text file")
    with pytest.raises(ModelLoadError, match="not a valid .safetensors"):
        load_base_model(str(notckpt))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(ModelLoadError, match="is a LoRA"):
        load_base_model(str(lora))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, sdxl)
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_base_model(str(sdxl))
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(1)}, other)
    with pytest.raises(ModelLoadError, match="no Stable Diffusion UNet"):
        load_base_model(str(other))
    folder = tmp_path / "emptyfolder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base_model(str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Could not download 'someone/some-model'"):
        load_base_model("someone/some-model")
    assert resolve_model_spec("runwayml/stable-diffusion-v1-5") == ("hub", "runwayml/stable-diffusion-v1-5")
    assert resolve_model_spec("builtin:tiny")[0] == "builtin"
    assert tiny_model_dir().is_dir()
