"""Base-model loading: builtin:tiny, diffusers folders, single-file checkpoints in the original layout, the shipped
SD1.5/SD2 configs and tokenizer, and the error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers_ldm import pipeline_to_ldm
from safetensors.torch import save_file

from sdlora.models.component_configs import (
    MODEL_CONFIGS,
    clip_vocab_and_merges,
    config_folder,
    write_config_folder,
)
from sdlora.models import (
    ModelLoadError,
    build_tiny_model,
    detect_architecture,
    file_quick_hash,
    load_base_model,
    predicts_v,
    resolve_model_spec,
    tiny_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def _probe(base):
    """Text encoder, UNet and VAE outputs on fixed inputs: equal outputs mean equal weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    img = torch.randn(1, 3, 64, 64, generator=g)
    ids = base.tokenizer(["a red circle on a blue background"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = base.text_encoder(ids)[0].float()
        return {"te": hidden, "unet": base.unet(x.to(base.unet.dtype), torch.tensor([10]), hidden.to(base.unet.dtype)).sample.float(),
                "enc": base.vae.encode(img).latent_dist.mean, "dec": base.vae.decode(x).sample}


def _assert_same(a, b, tol=1e-5):
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("builtin:tiny")


def test_builtin_tiny_loads_and_generates(tiny):
    base = tiny
    assert (base.family.name, base.prediction_type, base.default_resolution, base.kind, base.name) == \
        ("sd1", "epsilon", 64, "builtin", "builtin:tiny")
    assert base.noise_scheduler.config.prediction_type == "epsilon" and base.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert base.text_encoder.config.vocab_size == len(base.tokenizer)
    with torch.no_grad():
        latents = base.vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)
    ids = base.tokenizer("sdlora_mascot, a red circle").input_ids
    assert ids[0] == base.tokenizer.bos_token_id and ids[-1] == base.tokenizer.eos_token_id
    assert base.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "sdlora_mascot,aredcircle"
    for sampler in ("euler_a", "ddim"):
        pipe = base.make_pipeline(sampler)
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
        assert img.size == (64, 64)
        assert pipe.unet is base.unet and pipe.safety_checker is None
    with pytest.raises(ValueError, match="Unknown sampler 'plms'"):
        base.make_pipeline("plms")


def test_tiny_build_is_deterministic(tmp_path):
    a, b = build_tiny_model(tmp_path / "a"), build_tiny_model(tmp_path / "b")
    for part in ("unet", "vae", "text_encoder"):
        fa = next((a / part).glob("*.safetensors")).read_bytes()
        fb = next((b / part).glob("*.safetensors")).read_bytes()
        assert fa == fb, part
    for f in ("tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        assert (a / f).read_text() == (b / f).read_text()
    assert tiny_model_dir() == tiny_model_dir() and (tiny_model_dir() / "model_index.json").is_file()


def test_diffusers_folder(tiny, tmp_path):
    pipe = tiny.make_pipeline()
    pipe.save_pretrained(tmp_path / "my-model")
    loaded = load_base_model(str(tmp_path / "my-model"))
    assert (loaded.kind, loaded.family.name, loaded.name, loaded.default_resolution) == ("folder", "sd1", "my-model", 64)
    _assert_same(_probe(tiny), _probe(loaded), 0)
    v = load_base_model(str(tmp_path / "my-model"), prediction_type="v_prediction")
    assert v.noise_scheduler.config.prediction_type == "v_prediction" and v.model_hash == loaded.model_hash
    # Folders downloaded with only the fp16 variant of the weights
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    half = load_base_model(str(tmp_path / "fp16"))
    assert half.unet.dtype == torch.float32
    _assert_same(_probe(tiny), _probe(half), 0)


def test_single_file_in_original_layout(tiny, tmp_path, monkeypatch):
    sd = pipeline_to_ldm(tiny)
    path = tmp_path / "tiny-model.safetensors"
    save_file(sd, path)
    assert resolve_model_spec(str(path)) == ("single_file", str(path))
    loaded = load_base_model(str(path))
    assert (loaded.kind, loaded.family.name, loaded.name, loaded.prediction_type) == ("single_file", "sd1", "tiny-model", "epsilon")
    _assert_same(_probe(tiny), _probe(loaded))
    # fp16 files (how most checkpoints are shared) load into the requested dtype
    half = tmp_path / "tiny-fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half)
    loaded = load_base_model(str(half))
    assert loaded.unet.dtype == loaded.text_encoder.dtype == loaded.vae.dtype == torch.float32
    _assert_same(_probe(tiny), _probe(loaded), 0.05)
    bf16 = load_base_model(str(path), dtype=torch.bfloat16)
    assert bf16.unet.dtype == bf16.text_encoder.dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32

    # .ckpt the way the original SD files ship: weights plus PyTorch-Lightning's pickled training state
    lightning = {name: types.ModuleType(name) for name in
                 ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    lightning["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    for name, module in lightning.items():
        monkeypatch.setitem(sys.modules, name, module)
    callback = ModelCheckpoint()
    callback.best_model_score = np.float64(0.25)
    ckpt = tmp_path / "tiny-model.ckpt"
    torch.save({"state_dict": sd, "global_step": np.int64(470000), "callbacks": {ModelCheckpoint: callback}}, ckpt)
    for name in lightning:
        monkeypatch.delitem(sys.modules, name)
    loaded = load_base_model(str(ckpt))
    assert loaded.name == "tiny-model" and loaded.model_hash != file_quick_hash(path)
    _assert_same(_probe(tiny), _probe(loaded))

    # Older SD1 merges: text encoder keys without `text_model.` (saved by an older transformers)
    old = tmp_path / "old-layout.safetensors"
    save_file({k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
               for k, v in sd.items()}, old)
    _assert_same(_probe(tiny), _probe(load_base_model(str(old))))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_pickled_objects_need_explicit_opt_in(tiny, tmp_path, capsys):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(tiny), "payload": _Evil()}, ckpt, pickle_protocol=2)
    with pytest.raises(ModelLoadError, match=r"builtins\.print.*--allow-pickle"):
        load_base_model(str(ckpt))
    assert "code ran" not in capsys.readouterr().out
    loaded = load_base_model(str(ckpt), allow_pickle=True)
    _assert_same(_probe(tiny), _probe(loaded))


def _tiny_sd2(tiny, folder: Path):
    """builtin:tiny reshaped the SD2 way (linear attention projections, GELU text encoder, '!' padding,
    v-prediction), saved as a diffusers folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(tiny.unet.config, use_linear_projection=True, attention_head_dim=[2, 4, 4],
                                            upcast_attention=True)
    cfg = tiny.text_encoder.config.__class__.from_dict({**tiny.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    text_encoder = CLIPTextModel(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir() / "tokenizer", pad_token="!")
    sched = PNDMScheduler.from_config(MODEL_CONFIGS["sd2-v"]["scheduler"])
    pipe = StableDiffusionPipeline(unet=unet, vae=tiny.vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return SimpleNamespace(unet=unet, vae=tiny.vae, text_encoder=text_encoder, tokenizer=tokenizer)


def test_sd2_single_file_with_openclip_text_encoder(tiny, tmp_path):
    ref = _tiny_sd2(tiny, tmp_path / "tiny-sd2")
    path = tmp_path / "tiny-sd2.safetensors"
    save_file(pipeline_to_ldm(ref, openclip=True), path)
    with pytest.raises(ModelLoadError, match="non-standard sizes.*config_dir"):
        load_base_model(str(path))
    loaded = load_base_model(str(path), config_dir=tmp_path / "tiny-sd2")
    assert (loaded.family.name, loaded.prediction_type, loaded.tokenizer.pad_token) == ("sd2", "v_prediction", "!")
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.make_pipeline("dpm++").scheduler.config.prediction_type == "v_prediction"
    _assert_same(_probe(ref), _probe(loaded))
    assert load_base_model(str(path), config_dir=tmp_path / "tiny-sd2", prediction_type="epsilon").prediction_type == "epsilon"
    folder = load_base_model(str(tmp_path / "tiny-sd2"))
    assert (folder.family.name, folder.prediction_type) == ("sd2", "v_prediction")


class _FakeUNet(torch.nn.Module):
    """Answers like a trained SD2 UNet at t=999: about the input (epsilon) or about its negative (v)."""

    def __init__(self, v: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.v, self.config = v, SimpleNamespace(cross_attention_dim=1024)

    def forward(self, x, t, encoder_hidden_states):
        assert int(t) == 999 and encoder_hidden_states.shape[-1] == 1024
        return SimpleNamespace(sample=-3 * x if self.v else x * self.w)


def test_sd2_prediction_type_check():
    assert predicts_v(_FakeUNet(v=True)) and not predicts_v(_FakeUNet(v=False))


EXPECTED_PARAMS = {  # UNet, VAE, text encoder of the published SD1.5 and SD2.x models
    "sd15": (859_520_964, 83_653_863, 123_060_480),
    "sd2-v": (865_910_724, 83_653_863, 340_387_840),
    "sd2-base": (865_910_724, 83_653_863, 340_387_840),
}


@pytest.mark.parametrize("variant", ["sd15", "sd2-v", "sd2-base"])
def test_shipped_configs_match_the_real_architectures(variant, tmp_path):
    """Builds the real-sized models from the shipped configs on the meta device (no memory, no weights), writes their
    state dicts in the original single-file layout and checks diffusers' own converters map those keys back exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = config_folder(variant)
    cfg = {part: json.loads((folder / part / name).read_text()) for part, name in
           (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"))}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
    assert tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, te)) == EXPECTED_PARAMS[variant]

    sd2 = variant != "sd15"
    ldm = pipeline_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoder=te), openclip=sd2)
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert detect_architecture(shapes, Path("model.safetensors")) == ("sd2" if sd2 else "sd15")
    # A few shapes known from the published files.
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == ((320, 320) if sd2 else (320, 320, 1, 1))
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    if sd2:
        assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)
    else:
        assert shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)

    def same(converted, module):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in converted.items()}
        got = {k: v for k, v in got.items() if k in want or k not in ("embeddings.position_ids", "text_projection.weight")}
        assert got == want

    same(convert_ldm_unet_checkpoint(ldm, cfg["unet"]), unet)
    same(convert_ldm_vae_checkpoint(ldm, cfg["vae"]), vae)
    same(convert_open_clip_checkpoint(te, ldm) if sd2 else convert_ldm_clip_checkpoint(ldm), te)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pred = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    assert pred == ("v_prediction" if variant == "sd2-v" else "epsilon")


def test_clip_tokenizer_from_vendored_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"], vocab["a</w>"]) == (49406, 49407, 0, 320)
    tok = CLIPTokenizer.from_pretrained(write_config_folder("sd15", tmp_path / "sd15") / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A photo of a CAT!").input_ids == [49406, 320, 1125, 539, 320, 2368, 256, 49407]
    assert (tok.pad_token, tok.pad_token_id, tok.model_max_length) == ("<|endoftext|>", 49407, 77)
    sd2 = CLIPTokenizer.from_pretrained(config_folder("sd2-v") / "tokenizer")
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    assert sd2("a photo of a cat", padding="max_length", max_length=10).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]


def test_clear_errors(tmp_path, monkeypatch):
    def fails(spec, match, **kw):
        with pytest.raises(ModelLoadError, match=match) as info:
            load_base_model(str(spec), **kw)
        return str(info.value)

    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_spec(str(tmp_path / "missing.safetensors"))
    assert "./models/nothing-here" in fails("./models/nothing-here", "not found")
    notckpt = tmp_path / "notes.safetensors"
    notckpt.write_text("hello, I am a text file")
    assert str(notckpt) in fails(notckpt, "not a valid .safetensors")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("hello, I am a text file too")
    fails(garbage, "not a readable checkpoint")
    (tmp_path / "notes.txt").write_text("x")
    fails(tmp_path / "notes.txt", "not a checkpoint file")

    def write(name, tensors):
        save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, tmp_path / name)
        return tmp_path / name

    assert "lora.safetensors' is a LoRA, not a base model" in fails(
        write("lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}), "LoRA")
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    fails(write("sdxl.safetensors", {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
                                     unet_in: (320, 4, 3, 3)}), "SDXL file without both text encoders")
    fails(write("flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": (3, 3)}), "Flux/SD3")
    fails(write("vae.safetensors", {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}),
          "is a VAE")
    msg = fails(write("other.safetensors", {"encoder.weight": (1,), "something.else": (2,)}), "no model.diffusion_model")
    assert "SD1.x, SD2.x (512 and 768-v) and SDXL" in msg
    fails(write("inpaint.safetensors", {unet_in: (320, 9, 3, 3)}), "inpainting model")
    fails(write("unet-only.safetensors", {unet_in: (320, 4, 3, 3)}), "no text encoder weights")
    fails(write("no-vae.safetensors", {unet_in: (320, 4, 3, 3), "cond_stage_model.transformer.text_model.x": (1,)}),
          "no VAE weights")
    fails("builtin:tiny", "prediction_type must be one of", prediction_type="v")

    folder = tmp_path / "emptyfolder"
    folder.mkdir()
    fails(folder, "model_index.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": [],
                                                         "text_encoder_2": []}))
    fails(folder, "lacks unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": [],
                                                         "text_encoder": [None, None], "text_encoder_2": []}))
    fails(folder, "SDXL refiner")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    fails(folder, "lacks unet/, vae/, text_encoder/, tokenizer/, scheduler/")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = fails("someone/some-model", r"Could not download 'someone/some-model' from the Hugging Face hub")
    assert "hf download someone/some-model" in msg and "--base-model" in msg
    assert resolve_model_spec("runwayml/stable-diffusion-v1-5") == ("hub", "runwayml/stable-diffusion-v1-5")
    assert resolve_model_spec("builtin:tiny")[0] == "builtin"
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        resolve_model_spec("builtin:huge")


def test_single_files_load_without_any_network(tiny, tmp_path):
    """A real user's machine is not in offline mode: loading must still never reach for the network."""
    path = tmp_path / "tiny-model.safetensors"
    save_file(pipeline_to_ldm(tiny), path)
    script = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network use attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer
from sdlora.models.component_configs import config_folder
from sdlora.models import load_base_model
base = load_base_model(sys.argv[1])
for variant in ("sd15", "sd2-v"):
    folder = config_folder(variant)
    UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
    CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
    CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
print("ok", base.family.name)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok sd1")
