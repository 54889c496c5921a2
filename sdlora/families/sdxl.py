"""SDXL: two text encoders (CLIP-L and OpenCLIP bigG), a pooled embedding and size conditioning; kohya names its
UNet modules by the original SGM layout (`input_blocks.4.1...`), not by diffusers paths."""

from __future__ import annotations

import torch

from ..formats.ldm_names import diffusers_to_ldm
from ..formats.kohya_names import unet_kohya_prefix
from ..formats.ldm_checkpoint import SDXL_LAYOUT
from .base import Conditioning, ModelFamily, SampleGeometry, TextEmbedding


class SDXL(ModelFamily):
    name, label, native_resolution = "sdxl", "SDXL", 1024
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_te_prefixes = ("lora_te1", "lora_te2")
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_options = {"force_zeros_for_empty_prompt": True}
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    claim_priority = 2  # its LoRAs carry lora_unet_ keys too
    single_file_layout = SDXL_LAYOUT
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    context_dim = 2048  # CLIP-L (768) and OpenCLIP bigG (1280) side by side
    checkpoint_context_key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    checkpoint_architecture = single_file_configs = "sdxl"

    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        return "text_encoder_2" in index or unet_config.get("addition_embed_type") == "text_time"

    def claims_checkpoint(self, keys) -> bool:
        # Any embedder, so that the refiner (one OpenCLIP embedder) is claimed and refused by checkpoint_problem.
        return any(k.startswith("conditioner.embedders.") for k in keys)

    def checkpoint_problem(self, keys) -> str | None:
        if all(any(k.startswith(p) for k in keys) for p in self.single_file_layout.text_prefixes):
            return None
        return ("is the SDXL refiner (or an SDXL file without both text encoders): train LoRAs on the SDXL base model "
                "or a derivative.")

    def claims_lora(self, keys) -> bool:
        return any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or k.startswith("lora_unet_") and (
            "_input_blocks_" in k or "_output_blocks_" in k or "_middle_block_" in k) for k in keys)

    def clip_skip_problem(self, clip_skip: int, text_encoders: list) -> str | None:
        if clip_skip > 1:
            return (f"clip_skip {clip_skip}: SDXL always conditions on its text encoders' penultimate layers (kohya's "
                    "SDXL training ignores clip_skip too); set clip_skip = 1 for SDXL models.")
        return None

    def encode_tokens(self, text_encoders, ids, clip_skip: int = 1) -> TextEmbedding:
        # As diffusers' SDXL pipeline and kohya do: the penultimate hidden states of both encoders side by side, and
        # the second encoder's projected EOS embedding as the pooled vector.
        first = text_encoders[0](ids[0], output_hidden_states=True)
        second = text_encoders[1](ids[1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2].dtype)], dim=-1)
        return TextEmbedding(hidden=hidden, pooled=second[0])

    def time_ids(self, geometries: list[SampleGeometry]) -> torch.Tensor:
        return torch.tensor([[*g.original_size, *g.crop_top_left, *g.target_size] for g in geometries], dtype=torch.float32)

    def unet_forward(self, unet, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return unet(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample

    def fake_conditioning(self, unet_config, batch, tokens, dtype, size) -> Conditioning:
        pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        geometry = SampleGeometry(size, (0, 0), size)
        return Conditioning(hidden=torch.zeros(batch, tokens, unet_config.cross_attention_dim, dtype=dtype),
                            pooled=torch.zeros(batch, pooled_dim, dtype=dtype),
                            time_ids=self.time_ids([geometry] * batch).to(dtype))

    def pipeline(self, *, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusionXLPipeline

        # An empty negative prompt is encoded, not zeroed (as kohya's previews and A1111 do), so previews made from
        # cached prompt embeddings equal those made with the live text encoders.
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)

    def prompt_embeds_kwargs(self, prompt: TextEmbedding, negative: TextEmbedding) -> dict:
        return {"prompt_embeds": prompt.hidden, "pooled_prompt_embeds": prompt.pooled,
                "negative_prompt_embeds": negative.hidden, "negative_pooled_prompt_embeds": negative.pooled}

    def kohya_unet_prefix(self, module_path, unet_config) -> str | None:
        ldm = diffusers_to_ldm(module_path, unet_config)
        return None if ldm is None else unet_kohya_prefix(ldm)

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base"
