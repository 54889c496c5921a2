"""Component configs for the base models sdlora loads from single files, so no hub access is needed.

A downloaded SD1.5/SD2/SDXL `.safetensors` carries weights only; diffusers needs the component configs and a
tokenizer next to it. These are the published values of the reference diffusers folders, written out
into a cache folder on first use (`write_config_folder`). Each set names its family; a family names the set its
single files load with (`ModelFamily.single_file_configs`, `configs_by_prediction`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..families import FAMILIES
from .tokenizers import clip_vocab_and_merges, write_tokenizer

_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
}
_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512,
    "scaling_factor": 0.18215,
}
_UNET_SD1 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "sample_size": 64,
    "use_linear_projection": False,
}
# SD2's original code computes attention scores in fp32 (upcast), which keeps fp16/bf16 training finite.
_UNET_SD2 = dict(_UNET_SD1, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True)
_CLIP_L = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu", "hidden_size": 768,
    "intermediate_size": 3072, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1, "initializer_factor": 1.0, "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0,
}
# SD2 uses OpenCLIP ViT-H's text tower without its last layer (23 of 24), as diffusers' reference folder does.
_OPENCLIP_H = dict(_CLIP_L, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                   num_hidden_layers=23, projection_dim=512)

# SDXL 1.0 base, as published in its diffusers folder.
_UNET_SDXL = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# SDXL's VAE has the SD layout with another scaling factor; it overflows in fp16 (force_upcast), sdlora keeps it fp32.
_VAE_SDXL = dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_OPENCLIP_BIGG = dict(_CLIP_L, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                      intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
_SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "interpolation_type": "linear", "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

MODEL_CONFIGS = {
    "sd15": {"unet": _UNET_SD1, "vae": _VAE, "text_encoder": _CLIP_L, "scheduler": _SCHEDULER, "pad_token": "<|endoftext|>",
             "family": "sd1", "resolution": 512},
    "sd2-base": {"unet": dict(_UNET_SD2, sample_size=64), "vae": _VAE, "text_encoder": _OPENCLIP_H, "scheduler": _SCHEDULER,
                 "pad_token": "!", "family": "sd2", "resolution": 512},
    "sd2-v": {"unet": dict(_UNET_SD2, sample_size=96), "vae": dict(_VAE, sample_size=768), "text_encoder": _OPENCLIP_H,
              "scheduler": dict(_SCHEDULER, prediction_type="v_prediction"), "pad_token": "!", "family": "sd2",
              "resolution": 768},
    # The second tokenizer is the same BPE vocabulary padding with "!" (OpenCLIP's convention).
    "sdxl": {"unet": _UNET_SDXL, "vae": _VAE_SDXL, "text_encoder": _CLIP_L, "text_encoder_2": _OPENCLIP_BIGG,
             "scheduler": _SCHEDULER_SDXL, "pad_token": "<|endoftext|>", "pad_token_2": "!", "family": "sdxl",
             "resolution": 1024},
}


def config_digest(name: str) -> str:
    """Short hash of a variant's configs: a cached config folder is rewritten when sdlora's values change."""
    spec = MODEL_CONFIGS[name]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def config_folder(name: str) -> Path:
    """The cached config folder for a variant ('sd15', 'sd2-base', 'sd2-v', 'sdxl'), written on first use."""
    from ..paths import cache_dir

    return write_config_folder(name, cache_dir() / "configs" / f"{name}-{config_digest(name)}")


def write_config_folder(name: str, folder: Path) -> Path:
    """A diffusers-style folder (configs + tokenizer, no weights) that `from_single_file(config=...)` reads."""
    if (folder / "model_index.json").is_file():
        return folder
    spec = MODEL_CONFIGS[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        # The pipeline, its text encoders and their tokenizers are the family's; spec[...] holds their configs.
        family = FAMILIES[spec["family"]]
        index = {"_class_name": family.pipeline_class, "_diffusers_version": "0.42.1",
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        for encoder, tokenizer, cls in zip(family.text_encoder_names, family.tokenizer_names, family.text_encoder_classes,
                                           strict=True):
            index.update({encoder: ["transformers", cls], tokenizer: ["transformers", "CLIPTokenizer"]})
        index.update({"scheduler": ["diffusers", spec["scheduler"]["_class_name"]], **family.pipeline_options})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        for part in ("unet", "vae", *family.text_encoder_names, "scheduler"):
            (tmp / part).mkdir()
            fname = "scheduler_config.json" if part == "scheduler" else "config.json"
            (tmp / part / fname).write_text(json.dumps(spec[part], indent=1))
        vocab, merges = clip_vocab_and_merges()
        pads = [spec["pad_token"], spec.get("pad_token_2")]
        for tokenizer, pad in zip(family.tokenizer_names, pads):
            write_tokenizer(tmp / tokenizer, vocab, merges, pad_token=pad)
        if folder.exists():
            shutil.rmtree(tmp)
            return folder
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
