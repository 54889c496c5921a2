"""The built-in tiny models: SD1-shaped (builtin:tiny) and SDXL-shaped (builtin:tiny-xl), random weights, a small
CLIP tokenizer; built offline in seconds, for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .component_configs import MODEL_CONFIGS
from ..paths import cache_dir
from .tokenizers import write_word_tokenizers
from .toy import TOY_SPEC, TOY_VERSION, unpack_toy_model

TINY_SPEC = "builtin:tiny"
TINY_VERSION = "tiny-v1"
TINY_XL_SPEC = "builtin:tiny-xl"
TINY_XL_VERSION = "tiny-xl-v1"
# spec -> cache folder name
BUILTIN_MODELS = {TINY_SPEC: TINY_VERSION, TINY_XL_SPEC: TINY_XL_VERSION, TOY_SPEC: TOY_VERSION}
# The family each tiny model is shaped like (a single file of those sizes loads with its configs), and the width of
# their first UNet level, which tells them from full-size files.
TINY_MODELS = {"sd1": TINY_SPEC, "sdxl": TINY_XL_SPEC}
TINY_CHANNELS = 32

_TINY_WORDS = ("a an the of on in at with and photo picture red blue green yellow grey purple white black orange circle "
               "square background centered left right top bottom mascot sdlora style portrait of person dog cat man woman "
               "detailed high quality lowres blurry painting drawing sketch landscape city night day sky tree house").split()


def build_tiny_model(folder: Path) -> Path:
    """Write the tiny SD1-shaped model as a diffusers folder. Fixed seeds: the same weights every time."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_word_tokenizers(folder, _TINY_WORDS, ("tokenizer", "<|endoftext|>"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=False)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    scheduler = PNDMScheduler.from_config(MODEL_CONFIGS["sd15"]["scheduler"])
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_model_dir(spec: str = TINY_SPEC) -> Path:
    """Build once (in a temp folder, renamed into place, so concurrent first uses are safe), then reuse. builtin:toy is
    unpacked from sdlora/assets/toy instead of built."""
    version = BUILTIN_MODELS[spec]
    final = cache_dir() / version
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
    try:
        {TINY_SPEC: build_tiny_model, TINY_XL_SPEC: build_tiny_xl_model, TOY_SPEC: unpack_toy_model}[spec](tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_xl_model(folder: Path) -> Path:
    """Write the tiny SDXL-shaped model as a diffusers folder: SDXL's block layout (no attention in the first level,
    attention in the first up block, two layers per block), linear projections, several transformer layers per
    block, two text encoders (the second with a projection, padding with "!") and text_time size conditioning."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_word_tokenizers(folder, _TINY_WORDS, ("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))
    te1_width, te2_width, time_dim = 32, 64, 8
    torch.manual_seed(10)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=te1_width + te2_width,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2_width)
    torch.manual_seed(11)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    common = dict(vocab_size=len(vocab), max_position_embeddings=77, num_hidden_layers=3, bos_token_id=vocab["<|startoftext|>"],
                  eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(12)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=te1_width, intermediate_size=37, num_attention_heads=4,
                                                hidden_act="quick_gelu", projection_dim=te1_width, **common))
    torch.manual_seed(13)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=te2_width, intermediate_size=80,
                                                                num_attention_heads=4, hidden_act="gelu",
                                                                projection_dim=te2_width, **common))
    scheduler = EulerDiscreteScheduler.from_config(MODEL_CONFIGS["sdxl"]["scheduler"])
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                     tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
