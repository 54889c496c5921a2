"""kohya's module names: `lora_unet_<module path with _>` and `lora_te[1|2]_text_model_encoder_layers_N_<layer>`.

Text-encoder names come from the original CLIP module tree (text_model.encoder.layers.N...), mapped explicitly,
never from live module paths: transformers has moved `text_model.` once already.
"""

from __future__ import annotations

import re

# The first part of every key of a kohya/LyCORIS LoRA file: the UNet's, then the text encoders' (SD1/SD2: one, SDXL: two).
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_PREFIXES = (UNET_PREFIX, *TEXT_ENCODER_PREFIXES)
# The components a diffusers/PEFT LoRA file names its keys by.
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_TE_MODULE = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


class KohyaNameError(ValueError):
    pass


def text_encoder_kohya_prefix(module_path: str, prefix: str = "lora_te") -> str:
    m = _TE_MODULE.match(module_path)
    if not m:
        raise KohyaNameError(f"Text-encoder module '{module_path}' has no kohya name (expected encoder.layers.N.self_attn.*_proj "
                             "or mlp.fc1/fc2).")
    layer, sub = m.groups()
    return f"{prefix}_text_model_encoder_layers_{layer}_{sub.replace('.', '_')}"


def unet_kohya_prefix(module_path: str) -> str:
    """kohya's name for a module path of the UNet it trains (diffusers paths for SD1/SD2, LDM paths for SDXL)."""
    return UNET_PREFIX + module_path.replace(".", "_")


def is_text_encoder_prefix(prefix: str) -> bool:
    """Whether a kohya module prefix (or key) belongs to a text encoder."""
    return prefix.startswith(TEXT_ENCODER_PREFIXES)
