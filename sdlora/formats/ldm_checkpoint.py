"""Write a loaded model as one checkpoint in the original layout: SD1/SD2 the LDM/CompVis way (`model.diffusion_model.`,
`first_stage_model.`, `cond_stage_model.`), SDXL the way `sd_xl_base_1.0.safetensors` ships
(`conditioner.embedders.0.transformer.` CLIP-L, `conditioner.embedders.1.model.` OpenCLIP bigG). The layouts are
`SingleFileLayout` values; each family names its own (`ModelFamily.single_file_layout`), which recognition reads too.

It is the reverse of diffusers' single-file converters, generalised to any number of levels and layers per block, so
`merge` writes files AUTOMATIC1111/ComfyUI load as checkpoints and the tests write the tiny models the way real files
are distributed. Every function takes the module (for its config) and optionally a replacement state dict, so a
merged model is written without touching the loaded one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ldm_names import diffusers_to_ldm


def plain_state(module) -> dict[str, torch.Tensor]:
    """The module's own weights: a model carrying PEFT adapters (the UI's Try loads them into a shared model) is read
    through them, base weights under their plain names and no adapter tensors."""
    out = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def unet_to_ldm(unet, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The UNet state dict under `model.diffusion_model.` with LDM/SGM names (sdlora's own name map)."""
    out = {}
    for key, value in (plain_state(unet) if state is None else state).items():
        ldm = diffusers_to_ldm(key, unet.config)
        if ldm is None:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + ldm] = value
    return out


def vae_to_ldm(vae, state: dict | None = None) -> dict[str, torch.Tensor]:
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
    for key, value in (vae.state_dict() if state is None else state).items():
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


def text_encoder_to_ldm(text_encoder, prefix: str = "cond_stage_model.transformer.",
                        state: dict | None = None) -> dict[str, torch.Tensor]:
    """SD1 (and SDXL's first encoder under `conditioner.embedders.0.transformer.`): the transformers CLIPTextModel
    state dict under `<prefix>text_model.`."""
    out = {}
    for key, value in (plain_state(text_encoder) if state is None else state).items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    # Real SD1/SDXL files carry the (since non-persistent) position_ids buffer too.
    n = text_encoder.config.max_position_embeddings
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, device=value.device)[None]
    return out


_OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                   ("self_attn.out_proj.", "attn.out_proj.")]


def text_encoder_to_openclip_ldm(text_encoder, prefix: str = "cond_stage_model.model.",
                                 state: dict | None = None) -> dict[str, torch.Tensor]:
    """The OpenCLIP layout (SD2: `cond_stage_model.model.`, SDXL's second encoder: `conditioner.embedders.1.model.`),
    q/k/v fused into in_proj like open_clip stores them. A CLIPTextModelWithProjection's projection is written as
    OpenCLIP's `text_projection` of shape (width, projection_dim): the transpose of the nn.Linear weight, which is
    what diffusers' convert_open_clip_checkpoint transposes back."""
    sd = {k.removeprefix("text_model."): v for k, v in (plain_state(text_encoder) if state is None else state).items()}
    sd.pop("embeddings.position_ids", None)
    p = prefix
    out = {p + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           p + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           p + "ln_final.weight": sd.pop("final_layer_norm.weight"), p + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    device = out[p + "ln_final.weight"].device
    dtype = out[p + "ln_final.weight"].dtype
    projection = sd.pop("text_projection.weight", None)
    if projection is not None:
        out[p + "text_projection"] = projection.T
    else:  # SD2's CLIPTextModel has no projection; the file's is unused (diffusers skips it)
        hidden = text_encoder.config.hidden_size
        out[p + "text_projection"] = torch.zeros(hidden, hidden, device=device, dtype=dtype)
    out[p + "logit_scale"] = torch.ones((), device=device, dtype=dtype)
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{layer}self_attn.{x}_proj.{kind}") for x in "qkv"])
        for hf, ldm in _OPENCLIP_LAYER:
            for kind in ("weight", "bias"):
                out[block + ldm + kind] = sd.pop(layer + hf + kind)
    if sd:
        raise KeyError(f"unmapped text encoder keys {list(sd)}")
    return out


def _text_encoders(base) -> list:
    encoders = getattr(base, "text_encoders", None)
    if encoders:
        return list(encoders)
    return [base.text_encoder] + ([base.text_encoder_2] if getattr(base, "text_encoder_2", None) is not None else [])


@dataclass(frozen=True)
class SingleFileLayout:
    """How one original-layout checkpoint of a family stores its text encoders, and what else it carries. The UNet
    (`model.diffusion_model.`) and VAE (`first_stage_model.`) sit in the same place in every layout."""

    text_encoders: tuple[tuple[str, str, str], ...]  # (component, key prefix, "clip" | "openclip"), in the family's order
    schedule: bool = False                            # SD1/SD2 files carry the DDPM schedule and EMA counters

    @property
    def text_prefixes(self) -> tuple[str, ...]:
        return tuple(prefix for _, prefix, _ in self.text_encoders)


SD1_LAYOUT = SingleFileLayout((("text_encoder", "cond_stage_model.transformer.", "clip"),), schedule=True)
SD2_LAYOUT = SingleFileLayout((("text_encoder", "cond_stage_model.model.", "openclip"),), schedule=True)
# As `sd_xl_base_1.0.safetensors` ships: CLIP-L, then OpenCLIP bigG.
SDXL_LAYOUT = SingleFileLayout((("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
                                ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")))


def _finish(sd: dict) -> dict[str, torch.Tensor]:
    # Detached copies: the written file must not alias (or keep alive) a live model's parameters.
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def layout_to_ldm(base, layout: SingleFileLayout, states: dict | None = None) -> dict[str, torch.Tensor]:
    """A pipeline (or BaseModel) as one state dict in `layout`: UNet under `model.diffusion_model.` (SDXL's
    add_embedding as `label_emb.0.0/0.2`), VAE under `first_stage_model.`, each text encoder under its prefix.
    `states`: component name -> state dict to write instead of the module's own (a merged model's)."""
    states = states or {}
    sd = {}
    sd.update(unet_to_ldm(base.unet, states.get("unet")))
    sd.update(vae_to_ldm(base.vae, states.get("vae")))
    for (component, prefix, kind), encoder in zip(layout.text_encoders, _text_encoders(base), strict=True):
        write = text_encoder_to_openclip_ldm if kind == "openclip" else text_encoder_to_ldm
        sd.update(write(encoder, prefix=prefix, state=states.get(component)))
    if layout.schedule:
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        sd.update({"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0), "model_ema.decay": torch.tensor(0.9999),
                   "model_ema.num_updates": torch.tensor(0, dtype=torch.int32)})
    return _finish(sd)


def sdxl_pipeline_to_ldm(base, states: dict | None = None) -> dict[str, torch.Tensor]:
    """An SDXL pipeline (or BaseModel) in the `sd_xl_base_1.0.safetensors` layout."""
    return layout_to_ldm(base, SDXL_LAYOUT, states)


def pipeline_to_ldm(base, *, openclip: bool = False, states: dict | None = None) -> dict[str, torch.Tensor]:
    """A model whose family is not at hand (a bare diffusers pipeline) in the layout its text encoders call for:
    SDXL's for two, else SD1's, or SD2's with `openclip`. A loaded model's family names its own layout
    (`layout_to_ldm(model, model.family.single_file_layout)`)."""
    if len(_text_encoders(base)) == 2:
        return layout_to_ldm(base, SDXL_LAYOUT, states)
    return layout_to_ldm(base, SD2_LAYOUT if openclip else SD1_LAYOUT, states)
