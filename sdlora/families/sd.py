"""SD 1.x and SD 2.x: one CLIP text encoder, kohya names its UNet modules by their diffusers paths."""

from __future__ import annotations


from ..formats.kohya_names import unet_kohya_prefix
from ..formats.ldm_checkpoint import SD1_LAYOUT, SD2_LAYOUT
from .base import ModelFamily, TextEmbedding, cross_attention_width

_LORA_PREFIXES = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_", "unet.",
                  "text_encoder.")


def _linear_projection(unet_config) -> bool:
    return bool(unet_config.get("use_linear_projection") if isinstance(unet_config, dict)
                else unet_config.use_linear_projection)


class StableDiffusion(ModelFamily):
    """Shared by SD1 and SD2; they differ in text encoder (CLIP-L / OpenCLIP-H), sizes and metadata."""

    checkpoint_context_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    pipeline_options = {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    kohya_unet_names_are_diffusers_paths = True
    lora_label = "SD 1.x/2.x"  # SD1 and SD2 LoRAs share kohya's names: a file does not say which it is for

    def lora_compatible_with(self, other) -> bool:
        return isinstance(other, StableDiffusion)

    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        if "text_encoder_2" in index or unet_config.get("addition_embed_type") == "text_time":
            return False
        dim = cross_attention_width(unet_config)
        if dim in (768, 1024):
            return dim == self.context_dim
        # Test-sized models: SD2 is told apart by its linear attention projections.
        return _linear_projection(unet_config) == (self.name == "sd2")

    def claims_checkpoint(self, keys) -> bool:
        return any(k.startswith(self.single_file_layout.text_prefixes) for k in keys)

    def claims_lora(self, keys) -> bool:
        return any(k.startswith(_LORA_PREFIXES) for k in keys) and not any(
            k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "_input_blocks_" in k or "_output_blocks_" in k
            or "_middle_block_" in k for k in keys)

    def encode_tokens(self, text_encoders, ids, clip_skip: int = 1) -> TextEmbedding:
        if clip_skip <= 1:
            return TextEmbedding(hidden=text_encoders[0](ids[0])[0])
        # As kohya: the hidden state clip_skip layers from the end, through the encoder's final layer norm.
        encoder = text_encoders[0]
        states = encoder(ids[0], output_hidden_states=True).hidden_states
        model = getattr(encoder, "module", encoder)  # a DDP-wrapped encoder that trains
        model = getattr(model, "text_model", model)  # transformers before 5 nests the layers in text_model
        return TextEmbedding(hidden=model.final_layer_norm(states[-clip_skip]))

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
    single_file_layout = SD1_LAYOUT
    checkpoint_architecture = single_file_configs = "sd15"
    base_version, architecture = "sd_v1", "stable-diffusion-v1"

    def prepare_checkpoint(self, state: dict) -> dict:
        """Some SD1 merges were saved with an older transformers layout, `cond_stage_model.transformer.embeddings.*`
        without `text_model.`; diffusers' converter only recognises the newer names."""
        old, new = "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."
        if any(k.startswith(new) for k in state) or not any(k.startswith(old) for k in state):
            return state
        return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}


class SD2(StableDiffusion):
    name, label, native_resolution = "sd2", "SD 2.x", 768
    context_dim = 1024
    single_file_layout = SD2_LAYOUT
    claim_priority = 1  # a file with both text-encoder layouts was taken for SD2
    checkpoint_architecture = "sd2"
    # 512-base and 768-v share one layout: loaded with the 768-v configs, then settled by the prediction type.
    single_file_configs = "sd2-v"
    configs_by_prediction = {"v_prediction": "sd2-v", "epsilon": "sd2-base"}
    base_version = "sd_v2"

    def claims_lora(self, keys) -> bool:
        return False  # SD2 LoRAs carry SD1's kohya names: family_of_lora reports SD1 for both (lora_label says so)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
