"""SD 1.x and SD 2.x: one CLIP text encoder, kohya names its UNet modules by their diffusers paths."""

from __future__ import annotations


from ..formats.kohya_names import unet_kohya_prefix
from .base import ModelFamily, TextEmbedding

_LORA_PREFIXES = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_", "unet.",
                  "text_encoder.")


def _context_dim(unet_config) -> int:
    dim = unet_config.get("cross_attention_dim", 768) if isinstance(unet_config, dict) else unet_config.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


def _linear_projection(unet_config) -> bool:
    return bool(unet_config.get("use_linear_projection") if isinstance(unet_config, dict)
                else unet_config.use_linear_projection)


class StableDiffusion(ModelFamily):
    """Shared by SD1 and SD2; they differ in text encoder (CLIP-L / OpenCLIP-H), sizes and metadata."""

    context_dim: int = 768
    checkpoint_text_prefix: str = ""

    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        if "text_encoder_2" in index or unet_config.get("addition_embed_type") == "text_time":
            return False
        dim = _context_dim(unet_config)
        if dim in (768, 1024):
            return dim == self.context_dim
        # Test-sized models: SD2 is told apart by its linear attention projections.
        return _linear_projection(unet_config) == (self.name == "sd2")

    def claims_checkpoint(self, keys) -> bool:
        return any(k.startswith(self.checkpoint_text_prefix) for k in keys)

    def claims_lora(self, keys) -> bool:
        return any(k.startswith(_LORA_PREFIXES) for k in keys) and not any(
            k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "_input_blocks_" in k or "_output_blocks_" in k
            or "_middle_block_" in k for k in keys)

    def encode_tokens(self, text_encoders, ids) -> TextEmbedding:
        return TextEmbedding(hidden=text_encoders[0](ids[0])[0])

    def pipeline(self, *, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def kohya_unet_prefix(self, module_path, unet_config=None) -> str:
        return unet_kohya_prefix(module_path)

    # ss_base_model_version and modelspec.architecture (SD2 tells its 768-v and 512 variants apart)
    base_version: str = ""
    architecture: str = ""

    def base_model_version(self, prediction_type: str) -> str:
        return self.base_version

    def modelspec_architecture(self, prediction_type: str) -> str:
        return self.architecture


class SD1(StableDiffusion):
    name, label, native_resolution = "sd1", "SD 1.x", 512
    context_dim = 768
    checkpoint_text_prefix = "cond_stage_model.transformer."
    base_version, architecture = "sd_v1", "stable-diffusion-v1"


class SD2(StableDiffusion):
    name, label, native_resolution = "sd2", "SD 2.x", 768
    context_dim = 1024
    checkpoint_text_prefix = "cond_stage_model.model."
    base_version = "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
