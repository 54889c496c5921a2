"""A base model shared by the web UI's tabs stays the base model: generating with LoRAs of any type (LoHa, LoKr and
DoRA files are applied by sdlora, not by diffusers) changes none of its weights, so merge, extract and verify, which
read the same cached model, see the base."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file, save_file

from sdlora.formats.ldm_checkpoint import plain_state
from sdlora.formats.lora_file import module_index
from sdlora.inference.loras import load_loras, set_strengths, unload_loras
from sdlora.inference.sampling import SamplePrompt, generate

from conftest import model_and_pipeline

SMALL = SamplePrompt(prompt="a photo of sks", width=64, height=64, steps=2, seed=0)


def _formula_lora(base, path, seed=0):
    """LoHa on the UNet's attention projections, DoRA on the text encoder's: files diffusers cannot load."""
    g = torch.Generator().manual_seed(seed)
    comps = base.components()
    tensors = {}
    for prefix, (component, module_path) in sorted(module_index(base.family, comps).items()):
        shape = tuple(comps[component].get_submodule(module_path).weight.shape)
        if component == "unet" and module_path.endswith(("to_q", "to_v")):
            flat = shape[1] * math.prod(shape[2:])
            for key, size in (("hada_w1_a", (shape[0], 2)), ("hada_w1_b", (2, flat)), ("hada_w2_a", (shape[0], 2)),
                              ("hada_w2_b", (2, flat))):
                tensors[f"{prefix}.{key}"] = torch.randn(size, generator=g) * 0.3
        elif component == "text_encoder" and module_path.endswith("q_proj"):
            tensors[f"{prefix}.lora_down.weight"] = torch.randn((2, shape[1]), generator=g) * 0.2
            tensors[f"{prefix}.lora_up.weight"] = torch.randn((shape[0], 2), generator=g) * 0.2
            tensors[f"{prefix}.dora_scale"] = torch.rand((1, shape[1]), generator=g) + 0.5
        else:
            continue
        tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def _plain_lora(base, path, seed=1):
    g = torch.Generator().manual_seed(seed)
    comps = base.components()
    tensors = {}
    for prefix, (component, module_path) in sorted(module_index(base.family, comps).items()):
        if component != "unet" or not module_path.endswith("to_k"):
            continue
        out_f, in_f = comps[component].get_submodule(module_path).weight.shape
        tensors[f"{prefix}.lora_down.weight"] = torch.randn((2, in_f), generator=g) * 0.2
        tensors[f"{prefix}.lora_up.weight"] = torch.randn((out_f, 2), generator=g) * 0.2
        tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


def _weights(base) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().clone() for name, module in base.components().items()
            for key, value in plain_state(module).items()}


def test_generating_with_formula_loras_leaves_every_weight_bit_exact(tmp_path):
    base, pipe = model_and_pipeline("builtin:tiny")
    lora = _formula_lora(base, tmp_path / "loha.safetensors")
    before = _weights(base)
    plain = generate(pipe, SMALL, default_size=64)

    names = load_loras(pipe, [(lora, 1.0)])
    tried = generate(pipe, SMALL, default_size=64)
    assert _weights(base).keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in _weights(base).items())
    assert tried.tobytes() != plain.tobytes()  # the file was applied to the image all the same

    set_strengths(pipe, names, [0.0])  # strength 0 is the base model's own image
    assert generate(pipe, SMALL, default_size=64).tobytes() == plain.tobytes()
    set_strengths(pipe, names, [0.7])
    unload_loras(pipe)
    assert all(torch.equal(value, before[key]) for key, value in _weights(base).items())
    assert generate(pipe, SMALL, default_size=64).tobytes() == plain.tobytes()


def test_a_lora_tried_on_the_try_tab_is_not_baked_into_the_next_merge(tmp_path):
    from sdlora.ui.services import Services

    models = tmp_path / "models"
    models.mkdir()
    services = Services(output_root=tmp_path / "out", presets_dir=tmp_path, model_roots=[models])
    base = services.models.base_model("builtin:tiny")
    style = _plain_lora(base, models / "style.safetensors")
    loha = _formula_lora(base, models / "loha.safetensors")

    first = services.tools.merge("builtin:tiny", [(str(style), 1.0)], precision="fp32", name="first")
    services.tryout.generate("builtin:tiny", [(str(loha), 1.0)], "a photo of sks", steps=2, width=64, height=64)
    second = services.tools.merge("builtin:tiny", [(str(style), 1.0)], precision="fp32", name="second")

    a, b = load_file(str(first.path)), load_file(str(second.path))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
