"""SDXL base models offline: the diffusers <-> LDM/SGM UNet name map on the real configs, builtin:tiny-xl, SDXL diffusers
folders, single files in the `sd_xl_base_1.0.safetensors` layout, the shipped SDXL configs at real size (meta device,
no weights) and the error sentences for what sdlora refuses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import subprocess_env
from helpers_ldm import pipeline_to_ldm, sdxl_pipeline_to_ldm
from safetensors.torch import save_file

from sdlora.families import FAMILIES, SampleGeometry
from sdlora.formats.ldm_names import diffusers_to_ldm, ldm_to_diffusers
from sdlora.models.component_configs import MODEL_CONFIGS, config_folder
from sdlora.models import (
    TINY_XL_SPEC,
    ModelLoadError,
    build_tiny_xl_model,
    detect_architecture,
    file_quick_hash,
    load_base_model,
    read_checkpoint_keys,
    resolve_model_spec,
    tiny_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _meta_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _unet_config(name: str) -> dict:
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name]["unet"]
    spec = {"tiny": "builtin:tiny", "tiny-xl": TINY_XL_SPEC}[name]
    return json.loads((tiny_model_dir(spec) / "unet" / "config.json").read_text())


def _probe(base) -> dict[str, torch.Tensor]:
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


# --- the UNet name map -------------------------------------------------------------------------------------------


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


# --- builtin:tiny-xl and diffusers folders -----------------------------------------------------------------------


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
    probe = _probe(xl)
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


def test_tiny_xl_build_is_deterministic(tmp_path):
    a, b = build_tiny_xl_model(tmp_path / "a"), build_tiny_xl_model(tmp_path / "b")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert next((a / part).glob("*.safetensors")).read_bytes() == next((b / part).glob("*.safetensors")).read_bytes(), part
    for f in ("tokenizer_2/special_tokens_map.json", "tokenizer_2/vocab.json", "unet/config.json", "model_index.json"):
        assert (a / f).read_text() == (b / f).read_text()
    assert json.loads((a / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"


def test_sdxl_diffusers_folder(xl, tmp_path):
    folder = tmp_path / "my-xl"
    xl.make_pipeline().save_pretrained(folder)
    assert resolve_model_spec(str(folder)) == ("folder", str(folder))
    loaded = load_base_model(str(folder))
    assert (loaded.kind, loaded.family.name, loaded.name, loaded.default_resolution) == ("folder", "sdxl", "my-xl", 64)
    assert [t.pad_token for t in loaded.tokenizers] == ["<|endoftext|>", "!"]
    _assert_same(_probe(xl), _probe(loaded), 0)
    # A folder downloaded with only the fp16 variant of the weights
    xl.make_pipeline().save_pretrained(tmp_path / "fp16", variant="fp16")
    _assert_same(_probe(xl), _probe(load_base_model(str(tmp_path / "fp16"))), 0)

    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelLoadError, match=r"lacks text_encoder_2/: the diffusers model is incomplete"):
        load_base_model(str(folder))
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match=r"lacks text_encoder_2/, tokenizer_2/: the diffusers model is incomplete"):
        load_base_model(str(folder))


# --- single files in the sd_xl_base_1.0 layout -------------------------------------------------------------------


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
    ref = _probe(xl)
    _assert_same(ref, _probe(loaded))

    # .ckpt the way torch.save writes it
    ckpt = tmp_path / "tiny-xl-model.ckpt"
    torch.save({"state_dict": xl_ldm}, ckpt)
    from_ckpt = load_base_model(str(ckpt))
    assert (from_ckpt.family.name, from_ckpt.kind) == ("sdxl", "single_file")
    _assert_same(ref, _probe(from_ckpt))

    # fp16 files (how SDXL checkpoints are shared) load into the requested dtype, the VAE in float32
    half = tmp_path / "tiny-xl-fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in xl_ldm.items()}, half)
    loaded = load_base_model(str(half))
    assert {m.dtype for m in (loaded.unet, loaded.vae, *loaded.text_encoders)} == {torch.float32}
    _assert_same(ref, _probe(loaded), 0.05)
    bf16 = load_base_model(str(xl_file), dtype=torch.bfloat16)
    assert bf16.unet.dtype == bf16.text_encoders[1].dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32

    # config_dir: an SDXL folder of matching sizes works; an SD1 folder is refused with a sentence
    _assert_same(ref, _probe(load_base_model(str(xl_file), config_dir=tiny_model_dir(TINY_XL_SPEC))))
    with pytest.raises(ModelLoadError, match=r"holds an SD 1\.x model, but 'tiny-xl-model.safetensors' is an SDXL checkpoint"):
        load_base_model(str(xl_file), config_dir=tiny_model_dir())


def test_sdxl_single_file_loads_without_any_network(xl_file):
    """Not in offline mode, with sockets refused: the SDXL file and the shipped SDXL configs need no hub."""
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
folder = config_folder("sdxl")
UNet2DConditionModel.load_config(str(folder), subfolder="unet", local_files_only=True)
for part in ("text_encoder", "text_encoder_2"):
    CLIPTextConfig.from_pretrained(str(folder), subfolder=part, local_files_only=True)
print("ok", base.family.name, CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True).pad_token)
"""
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", script, str(xl_file)], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok sdxl !")


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
