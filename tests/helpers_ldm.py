"""Test helper: write a diffusers SD1-style pipeline as one checkpoint in the original (LDM/CompVis) layout.

It is the reverse of diffusers' single-file converter, generalised to any number of levels and layers
per block so the tiny model can be written the way SD1.5 files are distributed.
"""

from __future__ import annotations

import torch


def _unet_map(config) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) pairs for the UNet blocks."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    for i in range(n):
        for j in range(lpb):
            idx = (lpb + 1) * i + j + 1
            pairs.append((f"input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in down_types[i]:
                pairs.append((f"input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(lpb + 1):
            idx = (lpb + 1) * i + j
            pairs.append((f"output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in up_types[i]:
                pairs.append((f"output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            slot = 2 if "CrossAttn" in up_types[i] else 1
            pairs.append((f"output_blocks.{(lpb + 1) * i + lpb}.{slot}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    pairs += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
              ("middle_block.2.", "mid_block.resnets.1.")]
    return pairs


_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."),
           ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    pairs = sorted(_unet_map(unet.config), key=lambda p: -len(p[1]))
    out = {}
    for key, value in unet.state_dict().items():
        for ldm, hf in pairs:
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                    for a, b in _RESNET:
                        rest = rest.replace(b, a) if rest.startswith(b) else rest
                out["model.diffusion_model." + ldm + rest] = value
                break
        else:
            raise KeyError(f"unmapped UNet key {key}")
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    pairs = [("nin_shortcut.", "conv_shortcut."), ("norm_out.", "conv_norm_out.")]
    prefix_pairs = []
    for i in range(n):
        for j in range(vae.config.layers_per_block):
            prefix_pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            prefix_pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            prefix_pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        for j in range(vae.config.layers_per_block + 1):
            prefix_pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for part in ("encoder", "decoder"):
        for i in range(2):
            prefix_pairs.append((f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}."))
        prefix_pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for ldm, hf in sorted(prefix_pairs, key=lambda p: -len(p[1])):
            if new.startswith(hf):
                rest = new[len(hf):]
                if ".attentions." in hf:
                    for a, b in attn:
                        if rest.startswith(b):
                            rest = a + rest[len(b):]
                            if value.dim() == 2:
                                value = value[:, :, None, None]  # LDM stores attention projections as 1x1 convs
                            break
                new = ldm + rest
                break
        for a, b in pairs:
            new = new.replace(b, a)
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD1: the transformers CLIPTextModel state dict under cond_stage_model.transformer.text_model."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    # Real SD1 files carry the (since non-persistent) position_ids buffer too.
    n = text_encoder.config.max_position_embeddings
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n, device=value.device)[None]
    return out


_OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                   ("self_attn.out_proj.", "attn.out_proj.")]


def text_encoder_to_openclip_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """SD2: the OpenCLIP layout (cond_stage_model.model.*), q/k/v fused into in_proj like open_clip stores them."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           p + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           p + "ln_final.weight": sd.pop("final_layer_norm.weight"), p + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    hidden = text_encoder.config.hidden_size
    out[p + "text_projection"] = torch.zeros(hidden, hidden, device=out[p + "ln_final.weight"].device)
    out[p + "logit_scale"] = torch.ones((), device=out[p + "ln_final.weight"].device)
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{layer}self_attn.{x}_proj.{kind}") for x in "qkv"])
        for hf, ldm in _OPENCLIP_LAYER:
            for kind in ("weight", "bias"):
                out[block + ldm + kind] = sd.pop(layer + hf + kind)
    assert not sd, f"unmapped text encoder keys {list(sd)}"
    return out


def pipeline_to_ldm(base, *, openclip: bool = False) -> dict[str, torch.Tensor]:
    """The whole model as one original-layout state dict, with the extra entries real SD files carry."""
    sd = {}
    sd.update(unet_to_ldm(base.unet))
    sd.update(vae_to_ldm(base.vae))
    sd.update(text_encoder_to_openclip_ldm(base.text_encoder) if openclip else text_encoder_to_ldm(base.text_encoder))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd.update({"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0), "model_ema.decay": torch.tensor(0.9999),
               "model_ema.num_updates": torch.tensor(0, dtype=torch.int32)})
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}
