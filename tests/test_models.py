"""Base-model loading offline: builtin:tiny and builtin:tiny-xl, diffusers folders and single-file checkpoints of both
families (the same tests on each, parametrized), then what one family has: the SD1.5/SD2 configs, tokenizer and error
messages; SDXL's diffusers <-> LDM/SGM UNet name map on the real configs, single files in the
`sd_xl_base_1.0.safetensors` layout, the shipped SDXL configs at real size (meta device, no weights) and the sentences
for what sdlora refuses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from helpers_ldm import pipeline_to_ldm, sdxl_pipeline_to_ldm
from safetensors.torch import save_file

from sdlora.families import FAMILIES, SampleGeometry
from sdlora.formats.ldm_names import diffusers_to_ldm, ldm_to_diffusers
from sdlora.models.component_configs import (
    MODEL_CONFIGS,
    config_folder,
    write_config_folder,
)
from sdlora.models.tokenizers import clip_vocab_and_merges
from sdlora.models import (
    TINY_XL_SPEC,
    ModelLoadError,
    build_tiny_model,
    build_tiny_xl_model,
    detect_architecture,
    file_quick_hash,
    load_base_model,
    predicts_v,
    read_checkpoint_keys,
    resolve_model_spec,
    tiny_model_dir,
)

UNET = "model.diffusion_model."
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


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


def _xl_probe(base) -> dict[str, torch.Tensor]:
    """Both text encoders, the pooled embedding, the UNet (with SDXL's added conditioning) and the VAE on fixed inputs:
    equal outputs mean equal weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    img = torch.randn(1, 3, 64, 64, generator=g)
    fam = base.family
    with torch.no_grad():
        ids = fam.tokenize(base.tokenizers, ["a red circle on a blue background"])
        first = base.text_encoders[0](ids[0])[0].float()
        second = base.text_encoders[1](ids[1])
        text = fam.encode_tokens(base.text_encoders, ids)
        cond = fam.conditioning(text, [SampleGeometry((64, 64), (0, 0), (64, 64))]).to(dtype=base.unet.dtype)
        unet = fam.unet_forward(base.unet, x.to(base.unet.dtype), torch.tensor([10]), cond).float()
        return {"te1": first, "te2": second.last_hidden_state.float(), "te2_proj": second.text_embeds.float(),
                "hidden": text.hidden.float(), "pooled": text.pooled.float(), "unet": unet,
                "enc": base.vae.encode(img).latent_dist.mean, "dec": base.vae.decode(x).sample}


def _assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k] - b[k]).abs().max() <= tol, k


def _meta_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _unet_config(name: str) -> dict:
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name]["unet"]
    spec = {"tiny": "builtin:tiny", "tiny-xl": TINY_XL_SPEC}[name]
    return json.loads((tiny_model_dir(spec) / "unet" / "config.json").read_text())


@pytest.fixture(scope="module")
def xl():
    return load_base_model(TINY_XL_SPEC)


@pytest.fixture(scope="module")
def xl_ldm(xl):
    return sdxl_pipeline_to_ldm(xl)


@pytest.fixture(scope="module")
def xl_file(xl_ldm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdxl_file") / "tiny-xl-model.safetensors"
    save_file(xl_ldm, path)
    return path


def _probe_any(base) -> dict[str, torch.Tensor]:
    return (_xl_probe if base.family.name == "sdxl" else _probe)(base)


# What differs between the families' built-in models: the builder, the parts and text files it writes, the folder
# a diffusers save gets (its name is the model's name), the fixture holding the loaded model.
MODELS = {
    "sd1": dict(builder=build_tiny_model, fixture="tiny", folder="my-model", family="sd1",
                parts=("unet", "vae", "text_encoder"),
                files=("tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json",
                       "scheduler/scheduler_config.json")),
    "sdxl": dict(builder=build_tiny_xl_model, fixture="xl", folder="my-xl", family="sdxl",
                 parts=("unet", "vae", "text_encoder", "text_encoder_2"),
                 files=("tokenizer_2/special_tokens_map.json", "tokenizer_2/vocab.json", "unet/config.json",
                        "model_index.json")),
}
by_family = pytest.mark.parametrize("family", list(MODELS))


# --- the same on both families -----------------------------------------------------------------------------------


@by_family
def test_tiny_build_is_deterministic(family, tmp_path):
    m = MODELS[family]
    a, b = m["builder"](tmp_path / "a"), m["builder"](tmp_path / "b")
    for part in m["parts"]:
        fa = next((a / part).glob("*.safetensors")).read_bytes()
        fb = next((b / part).glob("*.safetensors")).read_bytes()
        assert fa == fb, part
    for f in m["files"]:
        assert (a / f).read_text() == (b / f).read_text(), f
    if family == "sd1":
        assert tiny_model_dir() == tiny_model_dir() and (tiny_model_dir() / "model_index.json").is_file()
    else:
        assert json.loads((a / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"


@by_family
def test_diffusers_folder(family, request, tmp_path):
    m = MODELS[family]
    base = request.getfixturevalue(m["fixture"])
    folder = tmp_path / m["folder"]
    pipe = base.make_pipeline()
    pipe.save_pretrained(folder)
    assert resolve_model_spec(str(folder)) == ("folder", str(folder))
    loaded = load_base_model(str(folder))
    assert (loaded.kind, loaded.family.name, loaded.name, loaded.default_resolution) == ("folder", m["family"], m["folder"], 64)
    _assert_same(_probe_any(base), _probe_any(loaded), 0)
    # Folders downloaded with only the fp16 variant of the weights
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    half = load_base_model(str(tmp_path / "fp16"))
    assert half.unet.dtype == torch.float32
    _assert_same(_probe_any(base), _probe_any(half), 0)
    if family == "sd1":
        v = load_base_model(str(folder), prediction_type="v_prediction")
        assert v.noise_scheduler.config.prediction_type == "v_prediction" and v.model_hash == loaded.model_hash
        return
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"lacks text_encoder_2/: the diffusers model is incomplete"):
        load_base_model(str(folder))
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match=r"lacks text_encoder_2/, tokenizer_2/: the diffusers model is incomplete"):
        load_base_model(str(folder))


NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network use attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer
from sdlora.models.component_configs import config_folder
from sdlora.models import load_base_model
base = load_base_model(sys.argv[1])
"""
NO_NETWORK_CONFIGS = {  # the shipped configs of each family, read with the hub out of reach
    "sd1": """
for variant in ("sd15", "sd2-v"):
    folder = config_folder(variant)
    UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
    CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
    CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
print("ok", base.family.name)
""",
    "sdxl": """
folder = config_folder("sdxl")
UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
for part in ("text_encoder", "text_encoder_2"):
    CLIPTextConfig.from_pretrained(str(folder), subfolder=part, local_files_only=True)
print("ok", base.family.name, CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True).pad_token)
""",
}


@by_family
def test_single_files_load_without_any_network(family, request, tmp_path):
    """A real user's machine is not in offline mode: with sockets refused, loading a single file and the shipped
    configs must still never reach for the network."""
    if family == "sd1":
        path = tmp_path / "tiny-model.safetensors"
        save_file(pipeline_to_ldm(request.getfixturevalue("tiny")), path)
    else:
        path = request.getfixturevalue("xl_file")
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", NO_NETWORK + NO_NETWORK_CONFIGS[family], str(path)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith({"sd1": "ok sd1", "sdxl": "ok sdxl !"}[family])


# --- SD1 and SD2 -------------------------------------------------------------------------------------------------


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


# --- SDXL: the UNet name map ---------------------------------------------------------------------------------------


BLOCK = re.compile(r"^(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)(resnets|attentions)\.\d+$")


@pytest.mark.parametrize("name", ["sdxl", "sd15", "sd2-v", "tiny-xl", "tiny"])
def test_name_map_covers_every_module_and_round_trips(name):
    cfg = _unet_config(name)
    unet = _meta_unet(cfg)
    mapped = {}
    for path, module in unet.named_modules():
        # every module holding weights of its own (all LoRA targets among them), and every ResNet/attention block
        if path and (any(True for _ in module.parameters(recurse=False)) or BLOCK.match(path)):
            ldm = diffusers_to_ldm(path, cfg)
            assert ldm is not None, path
            assert ldm_to_diffusers(ldm, cfg) == path, (path, ldm)
            mapped[path] = ldm
    assert len(set(mapped.values())) == len(mapped), "two diffusers modules share an LDM name"
    assert sum(bool(BLOCK.match(p)) for p in mapped) == len([p for p, _ in unet.named_modules() if BLOCK.match(p)]) > 0
    params = unet.state_dict()
    assert all(ldm_to_diffusers(diffusers_to_ldm(k, cfg), cfg) == k for k in params)
    # Outside the map: None, not a wrong name.
    assert diffusers_to_ldm("time_proj", cfg) is None and ldm_to_diffusers("first_stage_model.encoder", cfg) is None


@pytest.mark.parametrize("name", ["sdxl", "sd15", "sd2-v", "tiny-xl", "tiny"])
def test_name_map_agrees_with_diffusers_converter(name):
    """The LDM names written with sdlora's map are exactly those diffusers' own single-file converter reads back,
    tensor for tensor (meta tensors: the real-size UNets cost no memory)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = _unet_config(name)
    state = _meta_unet(cfg).state_dict()
    ldm = {UNET + diffusers_to_ldm(k, cfg): v for k, v in state.items()}
    assert len(ldm) == len(state)
    converted = convert_ldm_unet_checkpoint(ldm, cfg)
    assert set(converted) == set(state)
    assert all(converted[k] is state[k] for k in state)


SDXL_KOHYA_NAMES = {  # diffusers path -> the LDM/SGM name kohya's SDXL LoRAs use (lora_unet_ + dots as underscores)
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k": "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj": "middle_block.1.transformer_blocks.9.ff.net.0.proj",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.0.transformer_blocks.9.attn2.to_out.0": "output_blocks.0.1.transformer_blocks.9.attn2.to_out.0",
    "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",   # after an attention up block: slot 2
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.norm2": "output_blocks.8.0.out_layers.0",
    "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SD15_KOHYA_NAMES = {
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.3.resnets.1.conv1": "input_blocks.11.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",   # SD1.5's first up block has no attention: slot 1
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k": "output_blocks.11.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
}


@pytest.mark.parametrize("name,names", [("sdxl", SDXL_KOHYA_NAMES), ("sd15", SD15_KOHYA_NAMES)])
def test_name_map_spot_checks(name, names):
    cfg = MODEL_CONFIGS[name]["unet"]
    modules = dict(_meta_unet(cfg).named_modules())
    for hf, ldm in names.items():
        assert hf in modules, hf
        assert diffusers_to_ldm(hf, cfg) == ldm, hf
        assert ldm_to_diffusers(ldm, cfg) == hf, ldm
    if name == "sdxl":
        prefix = FAMILIES["sdxl"].kohya_unet_prefix("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", cfg)
        assert prefix == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        assert "output_blocks.2.1.conv" not in {diffusers_to_ldm(n, cfg) for n in modules}
    else:
        assert "output_blocks.2.2.conv" not in {diffusers_to_ldm(n, cfg) for n in modules}


# --- builtin:tiny-xl and single files in the sd_xl_base_1.0 layout ------------------------------------------------


def test_builtin_tiny_xl_loads(xl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert (xl.family.name, xl.kind, xl.name, xl.default_resolution, xl.prediction_type) == \
        ("sdxl", "builtin", TINY_XL_SPEC, 64, "epsilon")
    assert len(xl.text_encoders) == 2 and len(xl.tokenizers) == 2
    assert type(xl.text_encoders[0]) is CLIPTextModel and type(xl.text_encoders[1]) is CLIPTextModelWithProjection
    assert xl.components().keys() == {"unet", "text_encoder", "text_encoder_2"}
    tok1, tok2 = xl.tokenizers
    assert (tok1.pad_token, tok2.pad_token, tok2.pad_token_id) == ("<|endoftext|>", "!", tok2.convert_tokens_to_ids("!"))
    assert tok1.get_vocab() == tok2.get_vocab()
    ids = tok2(["a red circle"], padding="max_length", max_length=77).input_ids[0]
    assert ids[-1] == tok2.pad_token_id != tok2.eos_token_id
    assert xl.vae.config.scaling_factor == 0.13025 and xl.vae.config.force_upcast and xl.vae.dtype == torch.float32
    assert xl.unet.config.addition_embed_type == "text_time"
    width = sum(te.config.hidden_size for te in xl.text_encoders)
    assert xl.unet.config.cross_attention_dim == width
    assert type(xl.noise_scheduler).__name__ == "DDPMScheduler" and xl.noise_scheduler.config.beta_schedule == "scaled_linear"
    probe = _xl_probe(xl)
    assert probe["hidden"].shape == (1, 77, width) and probe["pooled"].shape == (1, xl.text_encoders[1].config.projection_dim)
    assert probe["unet"].shape == (1, 4, 8, 8) and torch.isfinite(probe["unet"]).all()

    pipe = xl.make_pipeline("euler")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.unet is xl.unet and pipe.text_encoder_2 is xl.text_encoders[1]
    img = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)

    half = load_base_model(TINY_XL_SPEC, dtype=torch.bfloat16)
    assert half.unet.dtype == half.text_encoders[0].dtype == half.text_encoders[1].dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32


def test_sdxl_writer_round_trips_through_diffusers_converters(xl, xl_ldm):
    """The helper writes exactly what diffusers' single-file converters read back, tensor for tensor."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    def same(converted, module, strip=False):
        want = module.state_dict()
        got = {(k.removeprefix("text_model.") if strip else k): v for k, v in converted.items()}
        got.pop("embeddings.position_ids", None)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k].reshape(want[k].shape), want[k]), k

    assert all(k.startswith((UNET, "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                             "conditioner.embedders.1.model.")) for k in xl_ldm)
    same(convert_ldm_unet_checkpoint(xl_ldm, dict(xl.unet.config)), xl.unet)
    same(convert_ldm_vae_checkpoint(xl_ldm, dict(xl.vae.config)), xl.vae)
    same(convert_ldm_clip_checkpoint(xl_ldm), xl.text_encoders[0], strip=True)
    same(convert_open_clip_checkpoint(xl.text_encoders[1], xl_ldm, prefix="conditioner.embedders.1.model."), xl.text_encoders[1])
    te2 = xl.text_encoders[1]
    p = "conditioner.embedders.1.model."
    # OpenCLIP stores the projection as (width, projection_dim): x @ text_projection, the transposed Linear weight.
    assert torch.equal(xl_ldm[p + "text_projection"], te2.text_projection.weight.T)
    assert xl_ldm[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * te2.config.hidden_size, te2.config.hidden_size)
    assert xl_ldm[UNET + "label_emb.0.0.weight"].shape == xl.unet.add_embedding.linear_1.weight.shape
    assert pipeline_to_ldm(xl).keys() == xl_ldm.keys()  # the general writer dispatches on the text_time UNet


def test_sdxl_single_file_loads_offline(xl, xl_ldm, xl_file, tmp_path):
    assert resolve_model_spec(str(xl_file)) == ("single_file", str(xl_file))
    assert detect_architecture(read_checkpoint_keys(xl_file, allow_pickle=False), xl_file) == "tiny-xl"
    loaded = load_base_model(str(xl_file))
    assert (loaded.family.name, loaded.kind, loaded.name, loaded.default_resolution, loaded.prediction_type) == \
        ("sdxl", "single_file", "tiny-xl-model", 64, "epsilon")
    assert loaded.model_hash == file_quick_hash(xl_file)
    assert [type(te).__name__ for te in loaded.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]
    assert loaded.vae.config.scaling_factor == 0.13025 and loaded.vae.dtype == torch.float32
    ref = _xl_probe(xl)
    _assert_same(ref, _xl_probe(loaded))

    # .ckpt the way torch.save writes it
    ckpt = tmp_path / "tiny-xl-model.ckpt"
    torch.save({"state_dict": xl_ldm}, ckpt)
    from_ckpt = load_base_model(str(ckpt))
    assert (from_ckpt.family.name, from_ckpt.kind) == ("sdxl", "single_file")
    _assert_same(ref, _xl_probe(from_ckpt))

    # fp16 files (how SDXL checkpoints are shared) load into the requested dtype, the VAE in float32
    half = tmp_path / "tiny-xl-fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in xl_ldm.items()}, half)
    loaded = load_base_model(str(half))
    assert {m.dtype for m in (loaded.unet, loaded.vae, *loaded.text_encoders)} == {torch.float32}
    _assert_same(ref, _xl_probe(loaded), 0.05)
    bf16 = load_base_model(str(xl_file), dtype=torch.bfloat16)
    assert bf16.unet.dtype == bf16.text_encoders[1].dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32

    # config_dir: an SDXL folder of matching sizes works; an SD1 folder is refused with a sentence
    _assert_same(ref, _xl_probe(load_base_model(str(xl_file), config_dir=tiny_model_dir(TINY_XL_SPEC))))
    with pytest.raises(ModelLoadError, match=r"holds an SD 1\.x model, but 'tiny-xl-model.safetensors' is an SDXL checkpoint"):
        load_base_model(str(xl_file), config_dir=tiny_model_dir())


def _write(path: Path, shapes: dict[str, tuple]) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path)
    return path


# The few keys of sd_xl_base_1.0.safetensors that recognition reads, at their real shapes; the rest stand in small.
REAL_SDXL_HEADER = {
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    UNET + "out.2.bias": (4,),
    "first_stage_model.encoder.conv_in.bias": (128,),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": (768,),
    "conditioner.embedders.1.model.ln_final.bias": (1280,),
}


def test_detects_real_sdxl_from_the_header(tmp_path):
    path = _write(tmp_path / "sd_xl_base_1.0.safetensors", REAL_SDXL_HEADER)
    assert resolve_model_spec(str(path)) == ("single_file", str(path))
    assert detect_architecture(read_checkpoint_keys(path, allow_pickle=False), path) == "sdxl"
    mixed = _write(tmp_path / "mixed.safetensors",
                   {**REAL_SDXL_HEADER, UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768)})
    with pytest.raises(ModelLoadError, match="mixes a SDXL text encoder with a UNet for 768-wide text embeddings"):
        resolve_model_spec(str(mixed))
    other = _write(tmp_path / "other.safetensors", {**REAL_SDXL_HEADER, UNET + "input_blocks.0.0.weight": (64, 4, 3, 3)})
    assert detect_architecture(read_checkpoint_keys(other, allow_pickle=False), other) == "custom"
    with pytest.raises(ModelLoadError, match="SDXL-style checkpoint with non-standard sizes.*config_dir"):
        load_base_model(str(other))


EXPECTED_SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_shipped_sdxl_configs_match_the_real_architecture(tmp_path):
    """The real-size SDXL 1.0 base built from the shipped configs on the meta device (no memory, no weights): the
    published parameter counts, the published key shapes in the single-file layout, and diffusers' converters
    mapping those keys back exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = config_folder("sdxl")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2"):
        assert (folder / part).is_dir(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    cfg = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True))
    got = {name: sum(p.numel() for p in m.parameters()) for name, m in
           (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2))}
    assert got == EXPECTED_SDXL_PARAMS
    assert all(p.is_meta for p in unet.parameters())
    assert vae.config.scaling_factor == 0.13025 and unet.config.sample_size * 8 == MODEL_CONFIGS["sdxl"]["resolution"] == 1024
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["prediction_type"]) == ("EulerDiscreteScheduler", "epsilon")
    tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    assert (tok1.pad_token, tok1.pad_token_id, tok2.pad_token, tok2.pad_token_id) == ("<|endoftext|>", 49407, "!", 0)
    assert tok2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]

    ldm = sdxl_pipeline_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoders=[te1, te2]))
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    assert detect_architecture(shapes, Path("sd_xl_base_1.0.safetensors")) == "sdxl"
    published = {  # shapes in sd_xl_base_1.0.safetensors
        UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
        UNET + "label_emb.0.0.weight": (1280, 2816),
        UNET + "input_blocks.4.1.proj_in.weight": (640, 640),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        UNET + "input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        UNET + "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        UNET + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        UNET + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        UNET + "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    assert {k: shapes.get(k) for k in published} == published
    assert not any(k.startswith(UNET + "output_blocks.2.1.conv") for k in shapes)
    assert sum(k.startswith(UNET) for k in shapes) == len(unet.state_dict())

    def same(converted, module):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted.items()}
        if "embeddings.token_embedding.weight" in want:  # transformers' flattened CLIPTextModel
            got = {k.removeprefix("text_model."): v for k, v in got.items()}
        got.pop("embeddings.position_ids", None)
        assert got == want

    same(convert_ldm_unet_checkpoint(ldm, cfg["unet"]), unet)
    same(convert_ldm_vae_checkpoint(ldm, cfg["vae"]), vae)
    same(convert_ldm_clip_checkpoint(ldm), te1)
    same(convert_open_clip_checkpoint(te2, ldm, prefix="conditioner.embedders.1.model."), te2)


def test_real_size_sdxl_file_goes_through_the_sdxl_configs(tmp_path):
    """A real-shaped (but nearly empty) SDXL .ckpt: recognised as real SDXL, loaded with the shipped SDXL configs
    (the real tensors it has are accepted by the 2.6B-parameter UNet built on the meta device) and refused with a
    sentence because the rest is missing. Every tensor shares one element of storage: a few KB on disk."""
    shapes = {**REAL_SDXL_HEADER, UNET + "label_emb.0.0.weight": (1280, 2816), UNET + "label_emb.0.0.bias": (1280,),
              UNET + "label_emb.0.2.weight": (1280, 1280), UNET + "label_emb.0.2.bias": (1280,)}
    ckpt = tmp_path / "sdxl-real-shapes.ckpt"
    torch.save({"state_dict": {k: torch.zeros(1).expand(*s) for k, s in shapes.items()}}, ckpt)
    assert ckpt.stat().st_size < 64 << 10
    assert detect_architecture(read_checkpoint_keys(ckpt, allow_pickle=False), ckpt) == "sdxl"
    with pytest.raises(ModelLoadError, match=r"'sdxl-real-shapes.ckpt' lacks weights for the UNet: the file is incomplete"):
        load_base_model(str(ckpt))
    # Without the size-conditioning embedding diffusers' converter stops at once: the same sentence, naming the tensor.
    save_file({k: torch.zeros(s) for k, s in REAL_SDXL_HEADER.items()}, tmp_path / "header-only.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks weights for the UNet \(e\.g\. label_emb\.0\.0\.weight\)"):
        load_base_model(str(tmp_path / "header-only.safetensors"))


# --- what sdlora refuses -----------------------------------------------------------------------------------------


def test_incomplete_sdxl_single_files_are_refused(xl_ldm, tmp_path):
    def fails(state: dict, name: str, match: str, ckpt: bool = False) -> str:
        path = tmp_path / name
        if ckpt:
            torch.save({"state_dict": state}, path)
        else:
            save_file(state, path)
        with pytest.raises(ModelLoadError, match=match) as info:
            load_base_model(str(path))
        assert "Traceback" not in str(info.value) and str(info.value).endswith(".")
        return str(info.value)

    # The SDXL refiner: one OpenCLIP encoder as conditioner.embedders.0.model.*, a 384-channel UNet
    refiner = {UNET + "input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3), "first_stage_model.encoder.conv_in.bias": torch.zeros(128),
               "conditioner.embedders.0.model.text_projection": torch.zeros(1280, 1280),
               "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1280)}
    for ckpt in (False, True):
        msg = fails(refiner, "sd_xl_refiner_1.0" + (".ckpt" if ckpt else ".safetensors"), "is the SDXL refiner", ckpt)
        assert "train LoRAs on the SDXL base model" in msg
    no_vae = {k: v for k, v in xl_ldm.items() if not k.startswith("first_stage_model.")}
    for ckpt in (False, True):
        fails(no_vae, "no-vae" + (".ckpt" if ckpt else ".safetensors"), r"has no VAE weights \(first_stage_model\.\*\)", ckpt)
    only_clip_l = {k: v for k, v in xl_ldm.items() if not k.startswith("conditioner.embedders.1.")}
    fails(only_clip_l, "one-encoder.safetensors", "without both text encoders")
    no_unet = {k: v for k, v in xl_ldm.items() if not k.startswith(UNET)}
    fails(no_unet, "no-unet.safetensors", r"no model\.diffusion_model\.\* UNet weights")
    # Files that pass recognition but lack tensors inside a component: the component named, no diffusers internals
    for drop, part in ((UNET + "input_blocks.1.0.in_layers.2.weight", "UNet"),
                       (UNET + "label_emb.0.2.bias", "UNet"),
                       ("first_stage_model.decoder.conv_out.weight", "VAE"),
                       ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "text encoder 1"),
                       ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", "text encoder 2")):
        msg = fails({k: v for k, v in xl_ldm.items() if k != drop}, "truncated.safetensors", f"lacks weights for the {part}\\b")
        assert "meta tensor" not in msg and "to_empty" not in msg


def test_sdxl_hub_id_offline_is_a_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_spec(SDXL_HUB_ID) == ("hub", SDXL_HUB_ID)
    with pytest.raises(ModelLoadError, match=r"Could not download 'stabilityai/stable-diffusion-xl-base-1.0' from the "
                                             r"Hugging Face hub \(offline mode: HF_HUB_OFFLINE is set\)") as info:
        load_base_model(SDXL_HUB_ID)
    assert f"hf download {SDXL_HUB_ID}" in str(info.value) and "--base-model" in str(info.value)
    # Through the CLI: one sentence on stderr, no traceback
    env = dict(subprocess_env(), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "sdlora", "generate", "--base-model", SDXL_HUB_ID, "--prompt", "a cat",
                          "--out", str(tmp_path / "cat.png")], env=env, capture_output=True, text=True, timeout=300,
                         check=False, cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not download 'stabilityai/stable-diffusion-xl-base-1.0'" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "cat.png").exists()
