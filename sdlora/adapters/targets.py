"""UNet and text-encoder targets: the shorthands users type, the layer groups the UI offers, the module names a
config may name. One copy: config validation, injection (`sdlora.adapters.inject`) and the UI's checkboxes all read it."""

from __future__ import annotations

_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
# Shorthand -> regex on the full UNet module path (diffusers names).
UNET_SHORTHANDS: dict[str, str] = {
    "attn": rf".*\.attn[12]\.{_ATTN_PROJ}$",
    "attn1": rf".*\.attn1\.{_ATTN_PROJ}$",
    "attn2": rf".*\.attn2\.{_ATTN_PROJ}$",
    # kohya's default set: every Linear / 1x1 conv inside the transformer blocks of the attentions
    "transformer": r".*attentions\.\d+\..*",
}
# Checkbox-friendly layer groups the UI offers; each maps to target names understood by resolve_unet_targets.
LAYER_GROUPS: dict[str, list[str]] = {
    "self-attention q/k/v/out": ["attn1"],
    "cross-attention q/k/v/out": ["attn2"],
    "proj in/out": ["proj_in", "proj_out"],
    "feed-forward": ["ff.net.0.proj", "ff.net.2"],
}
# Which layer-group names a shorthand covers (so a preset's shorthand shows as the right checkboxes).
SHORTHAND_GROUP_NAMES: dict[str, set[str]] = {
    "attn": {"attn1", "attn2"},
    "transformer": {name for names in LAYER_GROUPS.values() for name in names},
}
# Leaf names of the Linear / 1x1-conv modules in SD UNets' transformer blocks.
KNOWN_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# Other Linear / 1x1-conv leaves of SD UNets a user may name (checked again against the loaded model).
OTHER_UNET_LEAVES = ("conv_shortcut", "time_emb_proj", "linear_1", "linear_2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
