"""UNet module names between diffusers (`down_blocks.1.attentions.0...`) and the original LDM/SGM layout
(`input_blocks.4.1...`) that SD checkpoints and kohya's SDXL LoRAs use.

Derived from the UNet config (levels, layers per block, which blocks have attention), never copied from one
model: SDXL's first up block has attention, so its upsampler sits at `output_blocks.2.2`, where SD1's is at
`output_blocks.2.1`.
"""

from __future__ import annotations

from functools import lru_cache

# Inside a ResNet block the two layouts name the layers differently; attention blocks share their inner names.
RESNET_INNER = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _cfg(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def block_pairs(config) -> list[tuple[str, str, bool]]:
    """(ldm prefix, diffusers prefix, is_resnet) for every block of a UNet2DConditionModel config."""
    channels = _cfg(config, "block_out_channels")
    n = len(channels)
    down_types, up_types = _cfg(config, "down_block_types"), _cfg(config, "up_block_types")
    layers = _per_block(_cfg(config, "layers_per_block", 2), n)
    pairs = [("time_embed.0", "time_embedding.linear_1", False), ("time_embed.2", "time_embedding.linear_2", False),
             ("input_blocks.0.0", "conv_in", False), ("out.0", "conv_norm_out", False), ("out.2", "conv_out", False)]
    if _cfg(config, "addition_embed_type") == "text_time":
        pairs += [("label_emb.0.0", "add_embedding.linear_1", False), ("label_emb.0.2", "add_embedding.linear_2", False)]
    idx = 1
    for i in range(n):
        for j in range(layers[i]):
            pairs.append((f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", True))
            if "CrossAttn" in down_types[i]:
                pairs.append((f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", False))
            idx += 1
        if i < n - 1:
            pairs.append((f"input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
            idx += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
              ("middle_block.2", "mid_block.resnets.1", True)]
    up_layers = list(reversed(layers))
    idx = 0
    for i in range(n):
        for j in range(up_layers[i] + 1):
            pairs.append((f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", True))
            has_attn = "CrossAttn" in up_types[i]
            if has_attn:
                pairs.append((f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", False))
            if i < n - 1 and j == up_layers[i]:
                pairs.append((f"output_blocks.{idx}.{2 if has_attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", False))
            idx += 1
    return pairs


def _config_key(config) -> tuple:
    keys = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "addition_embed_type")
    return tuple(tuple(v) if isinstance(v := _cfg(config, k), (list, tuple)) else v for k in keys)


@lru_cache(maxsize=8)
def _tables(key: tuple):
    config = dict(zip(("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                       "addition_embed_type"), key))
    pairs = block_pairs(config)
    # Longest prefix first, so `down_blocks.1.resnets.1` is not taken for `down_blocks.1.resnets.10`.
    to_ldm = sorted(((hf, ldm, res) for ldm, hf, res in pairs), key=lambda p: -len(p[0]))
    to_hf = sorted(pairs, key=lambda p: -len(p[0]))
    return to_ldm, to_hf


def _swap(path: str, table, inner) -> str | None:
    for src, dst, is_resnet in table:
        if path == src or path.startswith(src + "."):
            rest = path[len(src):]
            if is_resnet and rest:
                for a, b in inner:
                    if rest == "." + a or rest.startswith("." + a + "."):
                        rest = "." + b + rest[len(a) + 1:]
                        break
            return dst + rest
    return None


def diffusers_to_ldm(path: str, config) -> str | None:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (None for a path outside the map)."""
    return _swap(path, _tables(_config_key(config))[0], tuple((hf, ldm) for ldm, hf in RESNET_INNER))


def ldm_to_diffusers(path: str, config) -> str | None:
    """The reverse of diffusers_to_ldm."""
    return _swap(path, _tables(_config_key(config))[1], RESNET_INNER)
