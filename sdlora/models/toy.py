"""builtin:toy: a small SD1-architecture model trained on simple scenes (scripts/train_toy_base.py), shipped as fp16
safetensors in sdlora/assets/toy/ and unpacked (hash-checked, as fp32) into the cache on first use. It draws prompts
such as "a red circle on a blue background" at 64 px, so the offline demo shows a LoRA teaching it something."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from .common import ModelLoadError

TOY_SPEC = "builtin:toy"
TOY_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"
# sha256 of assets/toy/SHA256SUMS, which lists every shipped file's sha256: one pin for the whole model
TOY_SHA256 = "667cc44ef7744d554b51b0ece9903ce3718c263f252dd2e34d5b91d5cb90aff2"
TOY_VERSION = f"toy-{TOY_SHA256[:12]}"


def build_toy_components(folder: Path, seed: int = 0):
    """Untrained (vae, unet, text_encoder, tokenizer, noise scheduler), the tokenizer written to folder/tokenizer.
    Each base-world word is one token; anything else (a trigger word) falls back to byte pieces the base never saw."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..data.scenes import WORDS
    from .component_configs import MODEL_CONFIGS
    from .tokenizers import write_word_tokenizers

    vocab = write_word_tokenizers(folder, WORDS, ("tokenizer", "<|endoftext|>"), merges=1000)
    tokenizer = CLIPTokenizer.from_pretrained(Path(folder) / "tokenizer")

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=16, sample_size=64, scaling_factor=1.0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16, use_linear_projection=False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    scheduler = DDPMScheduler.from_config({k: v for k, v in MODEL_CONFIGS["sd15"]["scheduler"].items()
                                           if not k.startswith("_") and k not in ("skip_prk_steps", "set_alpha_to_one")})
    return vae, unet, text_encoder, tokenizer, scheduler


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_toy_assets(out: Path, *, vae, unet, text_encoder, tokenizer_dir: Path, scheduler, info: dict) -> str:
    """Write the model as a diffusers folder with fp16 weights, plus SHA256SUMS; returns SHA256SUMS's own sha256."""
    import tempfile

    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    from .component_configs import MODEL_CONFIGS

    out = Path(out)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                   scheduler=PNDMScheduler.from_config(MODEL_CONFIGS["sd15"]["scheduler"]),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        for src in sorted(Path(tmp).rglob("*")):
            if not src.is_file():
                continue
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".safetensors":
                save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(src).items()}, dst)
            else:
                shutil.copyfile(src, dst)
    (out / "toy_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    sums = "".join(f"{_sha256(p)}  {p.relative_to(out).as_posix()}\n" for p in sorted(out.rglob("*")) if p.is_file())
    (out / "SHA256SUMS").write_text(sums, encoding="utf-8")
    return _sha256(out / "SHA256SUMS")


def unpack_toy_model(folder: Path, assets: Path = TOY_ASSETS, expected: str = TOY_SHA256) -> Path:
    """Check the shipped files against their pinned hashes and write them into `folder` as a diffusers model with
    fp32 weights (what the rest of sdlora loads; fp16 only keeps the repository small)."""
    from safetensors.torch import load_file, save_file

    damaged = ("sdlora's copy of the builtin:toy weights ({}) is damaged: {}. Restore the folder "
               "(git checkout -- sdlora/assets/toy) or use builtin:tiny.")
    sums_path = assets / "SHA256SUMS"
    if not sums_path.is_file():
        raise ModelLoadError(damaged.format(assets, "SHA256SUMS is missing"))
    if _sha256(sums_path) != expected:
        raise ModelLoadError(damaged.format(assets, "SHA256SUMS does not match the hash pinned in sdlora/models/toy.py"))
    folder = Path(folder)
    for line in sums_path.read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        src = assets / name
        if not src.is_file() or _sha256(src) != digest:
            raise ModelLoadError(damaged.format(assets, f"{name} is missing or altered"))
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".safetensors":
            save_file({k: v.to(torch.float32) for k, v in load_file(src).items()}, dst)
        else:
            shutil.copyfile(src, dst)
    return folder
