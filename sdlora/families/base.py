"""The model-family seam: everything that differs between SD1, SD2 and SDXL lives behind `ModelFamily`.

The training loop, the memory trace, verify, export and the UI talk to a family object and never ask
"is this SDXL?". A family knows how to recognise its files, which components it has, how captions become
conditioning, how its UNet is called, which pipeline renders previews, how its single-file checkpoints are laid out
and which configs they load with, what kohya calls its modules and what metadata other tools filter on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


def cross_attention_width(unet_config) -> int:
    """The text-embedding width a UNet cross-attends to (its config as a dict or a diffusers config)."""
    dim = unet_config.get("cross_attention_dim", 768) if isinstance(unet_config, dict) else unet_config.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


@dataclass
class TextEmbedding:
    """What the text encoders make of a batch of captions."""

    hidden: torch.Tensor                 # (B, tokens, width): what the UNet cross-attends to
    pooled: torch.Tensor | None = None   # (B, width2): SDXL's pooled embedding of the second encoder

    def rows(self) -> list[TextEmbedding]:
        return [TextEmbedding(self.hidden[i], None if self.pooled is None else self.pooled[i])
                for i in range(self.hidden.shape[0])]

    @staticmethod
    def stack(rows: list[TextEmbedding]) -> TextEmbedding:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return TextEmbedding(torch.stack([r.hidden for r in rows]), pooled)


@dataclass(frozen=True)
class SampleGeometry:
    """Where a training sample came from, in (height, width) pixel terms: SDXL's size conditioning."""

    original_size: tuple[int, int]    # the image's own size
    crop_top_left: tuple[int, int]    # offset of the crop in the resized image (mirrored when flipped)
    target_size: tuple[int, int]      # the size trained at (its bucket)


@dataclass
class Conditioning:
    """Everything the UNet is conditioned on besides the noisy latents and the timestep."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> Conditioning:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, hidden=move(self.hidden), pooled=move(self.pooled), time_ids=move(self.time_ids))


class ModelFamily:
    """One model family. Subclasses set the class attributes and override the hooks that differ."""

    name: str = ""                        # "sd1", "sd2", "sdxl": stored in configs and metadata
    label: str = ""                       # what the UI shows
    native_resolution: int = 512
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    kohya_te_prefixes: tuple[str, ...] = ("lora_te",)
    # Whether kohya names this family's UNet modules by their diffusers paths (then diffusers' own converter must agree).
    kohya_unet_names_are_diffusers_paths: bool = False

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"

    # --- recognising files --------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        """Whether a diffusers folder (model_index.json, unet/config.json) is of this family."""
        raise NotImplementedError

    def claims_checkpoint(self, keys: dict[str, tuple]) -> bool:
        """Whether an original-layout single-file checkpoint (key -> shape) is of this family."""
        raise NotImplementedError

    # Families are asked in descending order: one whose files also pass a broader family's test sits above it
    # (SDXL LoRAs carry lora_unet_ keys like SD1's).
    claim_priority: int = 0

    def claims_lora(self, keys: list[str]) -> bool:
        """Whether a LoRA file's keys were written for this family."""
        raise NotImplementedError

    # --- single-file checkpoints (the original LDM/SGM layout) -----------------------------------------
    single_file_layout = None             # formats.ldm_checkpoint.SingleFileLayout: where its text encoders sit
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)  # the transformers class of each text encoder
    context_dim: int = 768                # the text-embedding width its full-size UNet cross-attends to
    checkpoint_context_key: str = ""      # an original-layout UNet key whose last dimension is that width
    checkpoint_architecture: str = ""     # what detect_architecture calls a full-size file of this family
    single_file_configs: str = ""         # the shipped component configs (models/component_configs.py) it loads with
    # When one file layout serves several models: the shipped configs per prediction type, settled by a test pass
    # (models.loading.predicts_v) unless the user names the prediction type.
    configs_by_prediction: dict[str, str] = {}
    pipeline_options: dict[str, Any] = {}  # model_index.json entries of its pipeline besides the components

    def checkpoint_problem(self, keys) -> str | None:
        """What keeps a file this family claims from being a whole base model, as the rest of a sentence that starts
        with the file's name; None when nothing does."""
        return None

    def prepare_checkpoint(self, state: dict) -> dict:
        """The state dict with the names diffusers' converters expect, where files in circulation differ."""
        return state

    # --- conditioning ---------------------------------------------------------------------------------
    def tokenize(self, tokenizers: list, captions: list[str]) -> list[torch.Tensor]:
        # Over-long captions are truncated to CLIP's 77 positions; the dataset scan already warned about them.
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]

    def encode_tokens(self, text_encoders: list, ids: list[torch.Tensor], clip_skip: int = 1) -> TextEmbedding:
        """`clip_skip` k: condition on the hidden state k layers from the end (kohya's clip_skip; 1 = the last)."""
        raise NotImplementedError

    def encode(self, text_encoders: list, tokenizers: list, captions: list[str], device, clip_skip: int = 1) -> TextEmbedding:
        ids = [t.to(device) for t in self.tokenize(tokenizers, captions)]
        return self.encode_tokens(text_encoders, ids, clip_skip)

    def clip_skip_problem(self, clip_skip: int, text_encoders: list) -> str | None:
        """Why this family cannot condition on the layer `clip_skip` names (a sentence), or None."""
        layers = getattr(getattr(text_encoders[0], "config", None), "num_hidden_layers", None) if text_encoders else None
        if clip_skip > 1 and layers is not None and clip_skip > layers:
            return f"clip_skip {clip_skip}: this model's text encoder has only {layers} layers; use 1 to {layers}."
        return None

    def time_ids(self, geometries: list[SampleGeometry]) -> torch.Tensor | None:
        """Per-sample size conditioning; None for families without it."""
        return None

    def conditioning(self, text: TextEmbedding, geometries: list[SampleGeometry]) -> Conditioning:
        return Conditioning(hidden=text.hidden, pooled=text.pooled, time_ids=self.time_ids(geometries))

    def unet_forward(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The one place the UNet is called: training, the memory trace and verify all come through here."""
        return unet(noisy, timesteps, encoder_hidden_states=cond.hidden).sample

    def fake_conditioning(self, unet_config, batch: int, tokens: int, dtype: torch.dtype, size: tuple[int, int]) -> Conditioning:
        """Conditioning of the right shapes (values irrelevant) for the memory trace and probes."""
        width = unet_config.cross_attention_dim
        return Conditioning(hidden=torch.zeros(batch, tokens, width, dtype=dtype))

    # --- inference ------------------------------------------------------------------------------------
    pipeline_class: str = "StableDiffusionPipeline"

    def pipeline(self, *, unet, vae, text_encoders: list, tokenizers: list, scheduler):
        raise NotImplementedError

    def prompt_embeds_kwargs(self, prompt: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        """Pipeline arguments that replace the text encoders with already-encoded prompts."""
        return {"prompt_embeds": prompt.hidden, "negative_prompt_embeds": negative.hidden}

    # --- kohya names ----------------------------------------------------------------------------------
    def kohya_unet_prefix(self, module_path: str, unet_config) -> str | None:
        """kohya's name for a UNet module (diffusers path in); None if kohya has no name for it."""
        raise NotImplementedError

    def kohya_text_prefix(self, encoder_index: int, module_path: str) -> str | None:
        from ..formats.kohya_names import text_encoder_kohya_prefix

        return text_encoder_kohya_prefix(module_path, self.kohya_te_prefixes[encoder_index])

    def kohya_prefix(self, component: str, module_path: str, unet_config=None) -> str | None:
        if component == "unet":
            return self.kohya_unet_prefix(module_path, unet_config)
        return self.kohya_text_prefix(self.text_encoder_names.index(component), module_path)

    def lora_compatible_with(self, other: ModelFamily) -> bool:
        """Whether LoRA files of this family and of `other` name the same modules (they load on each other's bases)."""
        return other.name == self.name

    @property
    def lora_label(self) -> str:
        """How a LoRA file's family is named to the user (files do not tell compatible families apart)."""
        return self.label

    # --- metadata -------------------------------------------------------------------------------------
    def base_model_version(self, prediction_type: str) -> str:
        raise NotImplementedError

    def modelspec_architecture(self, prediction_type: str) -> str:
        raise NotImplementedError

    def metadata(self, prediction_type: str) -> dict[str, str]:
        """The keys A1111/Forge/ComfyUI filter and label LoRAs by."""
        return {
            "ss_base_model_version": self.base_model_version(prediction_type),
            "ss_v2": str(self.name == "sd2"),
            "modelspec.architecture": f"{self.modelspec_architecture(prediction_type)}/lora",
            "modelspec.implementation": self.modelspec_implementation,
        }

    modelspec_implementation: str = "diffusers"
