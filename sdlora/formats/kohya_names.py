"""kohya's module names: `lora_unet_<module path with _>` and `lora_te[1|2]_text_model_encoder_layers_N_<layer>`.

Text-encoder names come from the original CLIP module tree (text_model.encoder.layers.N...), mapped explicitly,
never from live module paths: transformers has moved `text_model.` once already.
"""

from __future__ import annotations

import re

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
    return "lora_unet_" + module_path.replace(".", "_")
