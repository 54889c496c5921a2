"""The LoRA tools (merge, resize, combine, extract) on the tiny SD1 and SDXL models: each tool's numeric property,
its refusals, its metadata, and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlora.formats import lycoris
from sdlora.tools import ToolError, combine_loras, extract_lora, merge_loras, resize_lora
from sdlora.formats.lora_file import module_index

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def tiny_xl():
    from sdlora.models import load_base_model

    return load_base_model("builtin:tiny-xl")


def _weights(base) -> dict[str, torch.Tensor]:
    """kohya prefix -> the base weight (fp32) of every module a LoRA may adapt."""
    comps = base.components()
    out = {}
    for prefix, (component, path) in module_index(base.family, comps).items():
        module = comps[component].get_submodule(path)
        out[prefix] = getattr(module, "base_layer", module).weight.detach().float()
    return out


def _chosen(base, conv: bool = True, te: bool = True) -> dict[str, tuple]:
    """Attention projections (UNet), text-encoder attention and MLP, and 3x3 ResNet convs: prefix -> (shape, path)."""
    comps = base.components()
    chosen = {}
    for prefix, (component, path) in module_index(base.family, comps).items():
        w = comps[component].get_submodule(path).weight
        if component == "unet":
            if path.endswith(ATTN) and ".attentions." in path or conv and path.endswith(("resnets.0.conv1", "resnets.1.conv2")):
                chosen[prefix] = tuple(w.shape)
        elif te:
            chosen[prefix] = tuple(w.shape)
    return chosen


def make_lora(base, path, *, rank=4, conv_rank=3, seed=0, conv=True, te=True, alpha=None, kinds=None, metadata=None):
    """A random LoRA/LoCon file for `base`. kinds: prefix -> 'loha' | 'lokr' | 'dora' | 'mid' for a few modules of
    other types (their shapes are the base model's)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    kinds = kinds or {}
    for prefix, shape in sorted(_chosen(base, conv, te).items()):
        out_f, in_f = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else ()
        r = conv_rank if len(kernel) and kernel != (1, 1) else rank
        kind = kinds.get(prefix, "lora")
        if kind == "loha":
            flat = in_f * math.prod(kernel)
            for k, s in (("hada_w1_a", (out_f, r)), ("hada_w1_b", (r, flat)), ("hada_w2_a", (out_f, r)), ("hada_w2_b", (r, flat))):
                tensors[f"{prefix}.{k}"] = torch.randn(s, generator=g) * 0.3
        elif kind == "lokr":
            tensors[f"{prefix}.lokr_w1"] = torch.randn((2, 2), generator=g) * 0.3
            tensors[f"{prefix}.lokr_w2_a"] = torch.randn((out_f // 2, r), generator=g) * 0.3
            tensors[f"{prefix}.lokr_w2_b"] = torch.randn((r, in_f // 2 * math.prod(kernel)), generator=g) * 0.3
        else:
            tensors[f"{prefix}.lora_down.weight"] = torch.randn((r, in_f, *kernel), generator=g) * 0.2
            up_shape = (out_f, r, 1, 1) if kernel else (out_f, r)
            tensors[f"{prefix}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.2
            if kind == "mid":
                del tensors[f"{prefix}.lora_down.weight"]
                tensors[f"{prefix}.lora_down.weight"] = torch.randn((r, in_f, 1, 1), generator=g) * 0.2
                tensors[f"{prefix}.lora_mid.weight"] = torch.randn((r, r, *kernel), generator=g) * 0.2
            if kind == "dora":
                tensors[f"{prefix}.dora_scale"] = torch.rand((1, in_f, *([1] * len(kernel))), generator=g) + 0.5
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha if alpha is not None else r / 2))
    md = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha or rank / 2), "ss_training_comment": "test"}
    md.update(base.family.metadata("epsilon"))
    md.update(metadata or {})
    save_file(tensors, str(path), metadata=md)
    return path


def deltas(path, weights: dict) -> dict[str, torch.Tensor]:
    """W' − W at strength 1 of every module of a LoRA file, through the loaders' formula."""
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return {p: lycoris.module_delta(parts, weights[p]) for p, parts in lycoris.group_modules(tensors).items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def rank_of(path, prefix) -> int:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_slice(f"{prefix}.lora_down.weight").get_shape()[0]


def _svals(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.flatten(1).double())


def _mixed_kinds(base) -> dict[str, str]:
    """One module each of LoHa, LoKr, DoRA and a Tucker (lora_mid) 3x3 conv, the rest LoRA/LoCon."""
    attn = sorted(p for p in _chosen(base) if p.startswith("lora_unet") and "attn" in p)
    conv = sorted(p for p, s in _chosen(base).items() if len(s) == 4 and s[2:] != (1, 1))
    return {attn[0]: "loha", attn[1]: "lokr", attn[2]: "dora", conv[0]: "mid"}


# --- resize ---------------------------------------------------------------------------------------------------
def test_resize_at_full_rank_is_exact_for_every_type(tiny, tmp_path):
    src = make_lora(tiny, tmp_path / "mixed.safetensors", rank=4, conv_rank=3, kinds=_mixed_kinds(tiny))
    result = resize_lora(src, tmp_path / "full.safetensors", rank=64, precision="fp32", base_model=tiny)
    weights = _weights(tiny)
    before, after = deltas(src, weights), deltas(result.path, weights)
    assert set(after) == set(before)
    worst = max(rel(after[p], before[p]) for p in before)
    assert worst <= 1e-5, worst
    assert all(r.fro_kept > 1 - 1e-6 for r in result.modules)
    # The LoHa module's ΔW has rank up to 4·4 = 16: it is kept whole, as LoRA factors.
    loha = next(p for p, k in _mixed_kinds(tiny).items() if k == "loha")
    assert rank_of(result.path, loha) > 4
    with safe_open(str(result.path), framework="pt") as fh:
        keys = set(fh.keys())
    assert not any(".hada_" in k or ".lokr_" in k or ".lora_mid" in k for k in keys)
    assert any(k.endswith(".dora_scale") for k in keys)  # DoRA keeps its magnitude; its direction part is resized


def test_resize_to_a_fixed_rank_is_the_best_approximation_and_keeps_alpha_over_rank(tiny, tmp_path):
    src = make_lora(tiny, tmp_path / "r8.safetensors", rank=8, conv_rank=8, alpha=4)  # alpha/rank = 0.5
    result = resize_lora(src, tmp_path / "r2.safetensors", rank=2, conv_rank=3, precision="fp32")
    weights = _weights(tiny)
    before, after = deltas(src, weights), deltas(result.path, weights)
    md = metadata(result.path)
    assert md["ss_network_dim"] == "2" and float(md["ss_network_alpha"]) == 1.0  # 0.5 x 2, as kohya rescales
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1"}
    for r in result.modules:
        s = _svals(before[r.name])
        conv3 = before[r.name].dim() == 4 and before[r.name].shape[2] == 3
        keep = 3 if conv3 else 2
        assert rank_of(result.path, r.name) == keep == r.rank_out and r.rank_in == 8
        # Eckart–Young: the error of the best rank-k approximation is the norm of the dropped singular values.
        err = float((after[r.name] - before[r.name]).double().norm())
        assert err == pytest.approx(float(s[keep:].norm()), rel=1e-4, abs=1e-7)
        assert r.fro_kept == pytest.approx(float(s[:keep].norm() / s.norm()), rel=1e-6)
        assert r.fro_kept < 1


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 3.0)])
def test_resize_dynamic_methods_keep_at_least_what_was_asked(tiny, tmp_path, method, param):
    src = make_lora(tiny, tmp_path / "r8.safetensors", rank=8, conv_rank=8, te=False)
    result = resize_lora(src, tmp_path / f"{method}.safetensors", rank=64, method=method, param=param, precision="fp32")
    weights = _weights(tiny)
    before, after = deltas(src, weights), deltas(result.path, weights)
    for r in result.modules:
        s = _svals(before[r.name])[:8]
        k = rank_of(result.path, r.name)
        assert k == r.rank_out
        fro = lambda n: float(s[:n].norm() / s.norm())  # noqa: E731
        if method == "sv_fro":  # enough Frobenius energy, and the fewest values that give it
            assert fro(k) >= param - 1e-9 and (k == 1 or fro(k - 1) < param)
        elif method == "sv_cumulative":
            cum = lambda n: float(s[:n].sum() / s.sum())  # noqa: E731
            assert cum(k) >= param - 1e-9 and (k == 1 or cum(k - 1) < param)
        else:  # every kept value within the ratio of the largest, every dropped one beyond it
            assert float(s[0] / s[k - 1]) <= param and (k == len(s) or float(s[0] / s[k]) > param)
        assert r.fro_kept == pytest.approx(fro(k), rel=1e-6)
        # What the file does is that truncation: its energy relative to the input's is the reported fraction.
        assert float(after[r.name].norm() / before[r.name].norm()) == pytest.approx(r.fro_kept, rel=1e-4)
    ranks = [r.rank_out for r in result.modules]
    assert min(ranks) < 8  # the rule cut something
    md = metadata(result.path)
    tool = json.loads(md["sdlora_tool"])
    assert tool["operation"] == "resize" and tool["method"] == method and tool["param"] == param
    linear = [r.rank_out for r in result.modules if not (before[r.name].dim() == 4 and before[r.name].shape[2] == 3)]
    assert md["ss_network_dim"] == str(max(linear))


def test_resize_metadata_records_what_was_done(tiny, tmp_path):
    from sdlora.formats.export import tensors_hash

    src = make_lora(tiny, tmp_path / "in.safetensors", rank=4, metadata={"ss_output_name": "mine", "ss_steps": "500"})
    out = resize_lora(src, tmp_path / "small.safetensors", rank=2).path
    md = metadata(out)
    tool = json.loads(md["sdlora_tool"])
    assert tool["operation"] == "resize" and tool["rank"] == 2 and tool["method"] == "rank"
    assert tool["inputs"] == [{"file": "in.safetensors", "sshs_model_hash": tensors_hash(src)}]
    assert md["sshs_model_hash"] == tensors_hash(out)
    assert md["ss_steps"] == "500" and md["ss_output_name"] == "mine"  # the training record stays
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "small" and "resized to rank 2 from rank 4" in md["ss_training_comment"]
    assert md["ss_save_precision"] == "fp32"  # the input's precision when none is asked
    with safe_open(str(out), framework="pt") as fh:
        assert fh.get_tensor(fh.keys()[0]).dtype == torch.float32


def test_resize_refusals_name_the_file(tiny, tmp_path):
    src = make_lora(tiny, tmp_path / "mixed.safetensors", kinds=_mixed_kinds(tiny))
    with pytest.raises(ToolError, match=r"mixed\.safetensors.*LoHa/LoKr.*--base-model"):
        resize_lora(src, tmp_path / "o.safetensors", rank=2)
    plain = make_lora(tiny, tmp_path / "plain.safetensors")
    with pytest.raises(ToolError, match="sv_fro needs a value"):
        resize_lora(plain, tmp_path / "o.safetensors", rank=2, method="sv_fro")
    with pytest.raises(ToolError, match="at most 1"):
        resize_lora(plain, tmp_path / "o.safetensors", rank=2, method="sv_fro", param=1.5)
    with pytest.raises(ToolError, match="1 or more"):
        resize_lora(plain, tmp_path / "o.safetensors", rank=0)
    with pytest.raises(ToolError, match="also an input"):
        resize_lora(plain, plain, rank=2)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(ToolError, match=r"ckpt\.safetensors' is a model checkpoint"):
        resize_lora(tmp_path / "ckpt.safetensors", tmp_path / "o.safetensors", rank=2)
    broken = {k: v for k, v in safe_load(plain).items()}
    key = next(k for k in broken if k.endswith("lora_up.weight"))
    broken[key] = broken[key][:, :1].contiguous()
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ToolError, match=r"broken\.safetensors' is damaged at .*does not fit lora_down"):
        resize_lora(tmp_path / "broken.safetensors", tmp_path / "o.safetensors", rank=2)
    assert not (tmp_path / "o.safetensors").exists()


def safe_load(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# --- combine --------------------------------------------------------------------------------------------------
def test_combine_exact_is_the_weighted_sum_of_effects(tiny, tmp_path):
    from sdlora.tools.verify import verify_lora

    a = make_lora(tiny, tmp_path / "a.safetensors", rank=4, conv_rank=3, kinds={
        k: v for k, v in _mixed_kinds(tiny).items() if v != "dora"})
    b = make_lora(tiny, tmp_path / "b.safetensors", rank=2, conv=False, seed=3, alpha=1)  # no 3x3 convs
    result = combine_loras([(a, 0.75), (b, -1.5)], tmp_path / "ab.safetensors", precision="fp32", base_model=tiny)
    weights = _weights(tiny)
    da, db, dab = deltas(a, weights), deltas(b, weights), deltas(result.path, weights)
    assert set(dab) == set(da) | set(db)
    for p in dab:
        want = 0.75 * da[p] if p in da else 0
        want = want - 1.5 * db[p] if p in db else want
        assert rel(dab[p], want) <= 1e-5, p
    plain = next(p for p in db if p in da and _mixed_kinds(tiny).get(p) is None)
    assert rank_of(result.path, plain) == 4 + 2  # ranks concatenated
    assert verify_lora(result.path, tiny).ok
    tool = json.loads(metadata(result.path)["sdlora_tool"])
    assert tool["operation"] == "combine" and [i["weight"] for i in tool["inputs"]] == [0.75, -1.5]


def test_combine_by_svd_is_the_best_rank_k_sum(tiny, tmp_path):
    a = make_lora(tiny, tmp_path / "a.safetensors", rank=4, te=False)
    b = make_lora(tiny, tmp_path / "b.safetensors", rank=4, te=False, seed=5)
    result = combine_loras([(a, 1.0), (b, 0.5)], tmp_path / "svd.safetensors", mode="svd", rank=3, conv_rank=2,
                           precision="fp32")
    weights = _weights(tiny)
    da, db, dc = deltas(a, weights), deltas(b, weights), deltas(result.path, weights)
    for p in dc:
        exact = da[p] + 0.5 * db[p]
        s = _svals(exact)
        keep = 2 if exact.dim() == 4 and exact.shape[2] == 3 else 3
        assert rank_of(result.path, p) == keep
        assert float((dc[p] - exact).double().norm()) == pytest.approx(float(s[keep:].norm()), rel=1e-4)
    md = metadata(result.path)
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3"


def test_combine_refuses_other_families_dora_and_mismatched_shapes(tiny, tiny_xl, tmp_path):
    sd1 = make_lora(tiny, tmp_path / "sd1.safetensors", te=False)
    xl = make_lora(tiny_xl, tmp_path / "xl.safetensors", te=False)
    with pytest.raises(ToolError, match=r"xl\.safetensors' is for SDXL.*sd1\.safetensors' is for SD 1"):
        combine_loras([(sd1, 1), (xl, 1)], tmp_path / "o.safetensors")
    dora = make_lora(tiny, tmp_path / "dora.safetensors", kinds=_mixed_kinds(tiny))
    with pytest.raises(ToolError, match=r"dora\.safetensors' is a DoRA file.*merge"):
        combine_loras([(sd1, 1), (dora, 1)], tmp_path / "o.safetensors", base_model=tiny)
    odd = safe_load(sd1)
    key = next(k for k in odd if k.endswith("attn1_to_q.lora_down.weight"))
    up = key.replace("lora_down", "lora_up")
    odd[key], odd[up] = torch.zeros(4, 7), torch.zeros(5, 4)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ToolError, match=r"odd\.safetensors' has .*attn1_to_q for a weight of shape \(5, 7\)"):
        combine_loras([(sd1, 1), (tmp_path / "odd.safetensors", 1)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# --- merge ----------------------------------------------------------------------------------------------------
def _expected_weights(base, files_and_strengths) -> dict[str, torch.Tensor]:
    """The base weights with each LoRA applied in turn as the loaders do: W += s·(W' − W), computed on the current W."""
    current = dict(_weights(base))
    for path, s in files_and_strengths:
        for prefix, parts in lycoris.group_modules(safe_load(path)).items():
            current[prefix] = current[prefix] + s * lycoris.module_delta(parts, current[prefix])
    return current


def _with_weights(base, weights: dict) -> dict:
    """Copies of the UNet and text encoders carrying `weights` (kohya prefix -> tensor)."""
    comps = {name: copy.deepcopy(module) for name, module in base.components().items()}
    with torch.no_grad():
        for prefix, (component, path) in module_index(base.family, comps).items():
            comps[component].get_submodule(path).weight.copy_(weights[prefix])
    return comps


def _outputs(family, comps) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    unet = comps["unet"]
    cfg = unet.config
    cond = family.fake_conditioning(cfg, 2, 5, torch.float32, (64, 64))
    cond.hidden = torch.randn(cond.hidden.shape, generator=g)
    if cond.pooled is not None:
        cond.pooled = torch.randn(cond.pooled.shape, generator=g)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ids = torch.randint(1, 40, (2, 6), generator=g)
    with torch.no_grad():
        out = family.unet_forward(unet, x, torch.tensor([10, 500]), cond)
        hidden = [comps[n](ids)[0] for n in family.text_encoder_names]
    return out, hidden


@pytest.mark.parametrize("which", ["tiny", "tiny_xl"])
def test_merge_equals_base_plus_loras(which, request, tmp_path):
    from sdlora.formats.export import tensors_hash
    from sdlora.models import load_base_model

    base = request.getfixturevalue(which)
    kinds = _mixed_kinds(base)
    a = make_lora(base, tmp_path / "a.safetensors", rank=4, conv_rank=3, kinds=kinds)
    b = make_lora(base, tmp_path / "b.safetensors", rank=2, seed=9)
    loras = [(a, 0.8), (b, -0.5)]
    result = merge_loras(base, loras, tmp_path / "merged.safetensors", precision="fp32")
    merged = load_base_model(str(result.path))
    assert merged.family.name == base.family.name
    expected = _expected_weights(base, loras)
    got = _weights(merged)
    adapted = set(lycoris.group_modules(safe_load(a))) | set(lycoris.group_modules(safe_load(b)))
    for prefix, w in expected.items():
        if prefix in adapted:
            assert rel(got[prefix], w) <= 1e-6, prefix
        else:
            assert torch.equal(got[prefix], w), prefix
    # Everything else (norms, biases, embeddings, the VAE) is the base model's, bit for bit.
    from sdlora.formats.ldm_checkpoint import plain_state

    compared = {(c, f"{path}.weight") for c, path in module_index(base.family, base.components()).values()}
    mine = {**merged.components(), "vae": merged.vae}
    for name, module in {**base.components(), "vae": base.vae}.items():
        ref, own = plain_state(module), plain_state(mine[name])
        assert set(ref) == set(own)
        for key, value in ref.items():
            if (name, key) not in compared:
                assert torch.equal(own[key], value), (name, key)
    # And the models compute the same: the merged checkpoint against base + LoRA weights set by hand.
    out_ref, hidden_ref = _outputs(base.family, _with_weights(base, expected))
    out, hidden = _outputs(merged.family, merged.components())
    out_base, _ = _outputs(base.family, base.components())
    assert float((out - out_ref).abs().max()) <= 1e-5 * float(out_ref.abs().max())
    assert float((out_ref - out_base).abs().max()) > 1e-3  # the LoRAs do change the output
    for h, h_ref in zip(hidden, hidden_ref):
        assert float((h - h_ref).abs().max()) <= 1e-5 * float(h_ref.abs().max())
    md = metadata(result.path)
    tool = json.loads(md["sdlora_tool"])
    assert tool["operation"] == "merge"
    assert tool["inputs"] == [{"file": "a.safetensors", "sshs_model_hash": tensors_hash(a), "strength": 0.8},
                              {"file": "b.safetensors", "sshs_model_hash": tensors_hash(b), "strength": -0.5}]
    assert md["modelspec.architecture"] == base.family.modelspec_architecture("epsilon")
    assert not md["modelspec.architecture"].endswith("/lora")


def test_merge_refuses_other_models_loras(tiny, tiny_xl, tmp_path):
    xl = make_lora(tiny_xl, tmp_path / "xl.safetensors")
    with pytest.raises(ToolError, match=r"xl\.safetensors' is for SDXL.*builtin:tiny"):
        merge_loras(tiny, [(xl, 1.0)], tmp_path / "m.safetensors")
    sd1 = safe_load(make_lora(tiny, tmp_path / "sd1.safetensors"))
    extra = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}
    save_file({**sd1, **extra}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ToolError, match=r"other\.safetensors' adapts 1 module.*down_blocks_7.*another model"):
        merge_loras(tiny, [(tmp_path / "other.safetensors", 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --- extract --------------------------------------------------------------------------------------------------
def _fine_tuned(base, seed=0):
    """A copy of `base` with some attention, ResNet-conv and text-encoder weights changed: kohya prefix -> change."""
    tuned = copy.deepcopy(base)
    comps = tuned.components()
    g = torch.Generator().manual_seed(seed)
    changes = {}
    index = module_index(tuned.family, comps)
    # Every text-encoder module: diffusers' loader, which verify checks files with, misreads text-encoder LoRAs that
    # lack some of them (e.g. without out_proj).
    picks = [p for p in sorted(index) if p.startswith("lora_te") or p.endswith(
        ("attn2_to_k", "attn1_to_out_0", "ff_net_2", "resnets_0_conv1", "in_layers_2"))]
    with torch.no_grad():
        for prefix in picks:
            component, path = index[prefix]
            w = comps[component].get_submodule(path).weight
            change = torch.randn(w.shape, generator=g) * 0.01
            w.add_(change)
            changes[prefix] = change
    return tuned, changes


def test_extract_at_full_rank_reproduces_the_difference(tiny, tmp_path):
    from sdlora.tools.verify import verify_lora

    tuned, changes = _fine_tuned(tiny)
    result = extract_lora(tuned, tiny, tmp_path / "x.safetensors", rank=128, conv_rank=512, precision="fp32")
    got = deltas(result.path, _weights(tiny))
    assert set(got) == set(changes)  # unchanged modules are left out
    assert any(p.startswith("lora_te_") for p in got) and any(p.endswith("conv1") for p in got)
    for prefix, change in changes.items():
        assert rel(got[prefix], change) <= 1e-5, prefix
    assert verify_lora(result.path, tiny).ok
    md = metadata(result.path)
    tool = json.loads(md["sdlora_tool"])
    assert tool["operation"] == "extract" and [i["role"] for i in tool["inputs"]] == ["fine-tuned", "base"]
    assert md["ss_sd_model_name"] == tiny.name and md["ss_network_train_unet_only"] == "False"

    # Without a conv rank the 3x3 convs stay out (kohya's default module set); UNet only leaves the text encoder out.
    small = extract_lora(tuned, tiny, tmp_path / "y.safetensors", rank=2, text_encoders=False, precision="fp32")
    names = {r.name for r in small.modules}
    assert names == {p for p in changes if p.startswith("lora_unet") and not p.endswith("conv1")}
    assert all(r.rank_out == 2 and r.fro_kept < 1 for r in small.modules)


def test_extract_sdxl_and_its_refusals(tiny, tiny_xl, tmp_path):
    tuned, changes = _fine_tuned(tiny_xl, seed=1)
    result = extract_lora(tuned, tiny_xl, tmp_path / "xl.safetensors", rank=128, conv_rank=512, precision="fp32")
    got = deltas(result.path, _weights(tiny_xl))
    assert set(got) == set(changes) and any(p.startswith("lora_te2_") for p in got)
    assert max(rel(got[p], c) for p, c in changes.items()) <= 1e-5
    assert metadata(result.path)["ss_base_model_version"] == "sdxl_base_v1-0"
    with pytest.raises(ToolError, match="is SDXL but the base model .* is SD 1"):
        extract_lora(tuned, tiny, tmp_path / "bad.safetensors", rank=4)
    with pytest.raises(ToolError, match="nothing to extract"):
        extract_lora(tiny, tiny, tmp_path / "bad.safetensors", rank=4)


# --- the CLI --------------------------------------------------------------------------------------------------
def test_cli_merge_extract_resize_combine(tiny, tmp_path, capsys):
    from sdlora.cli import main

    lora = make_lora(tiny, tmp_path / "style.safetensors", rank=4, conv_rank=3)

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("merge", "--base-model", "builtin:tiny", "--lora", f"{lora}:0.7", "--out", tmp_path / "m16.safetensors")
    assert code == 0 and out.strip().splitlines()[-1] == str((tmp_path / "m16.safetensors").resolve())
    assert "merge" in err and "module" in err  # the progress bar
    with safe_open(str(tmp_path / "m16.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16  # the default
    code, _, _ = run("merge", "--base-model", "builtin:tiny", "--lora", f"{lora}:0.7", "--out", tmp_path / "m.safetensors",
                     "--save-precision", "fp32", "--quiet")
    assert code == 0
    code, out, err = run("extract", "--tuned", tmp_path / "m.safetensors", "--base-model", "builtin:tiny", "--rank", "64",
                         "--conv-rank", "64", "--save-precision", "fp32", "--out", tmp_path / "x.safetensors", "--quiet")
    assert code == 0, err
    weights = _weights(tiny)
    want, got = deltas(lora, weights), deltas(tmp_path / "x.safetensors", weights)
    assert set(got) == set(want) and max(rel(got[p], 0.7 * want[p]) for p in want) <= 1e-5
    code, out, err = run("resize", tmp_path / "x.safetensors", "--rank", "8", "--method", "sv_fro", "--param", "0.95",
                         "--out", tmp_path / "r.safetensors", "--verbose", "--quiet")
    assert code == 0 and "kept" in err and "Frobenius" in err
    code, out, err = run("verify", tmp_path / "r.safetensors", "--base-model", "builtin:tiny")
    assert code == 0 and out.strip().endswith("OK")
    code, out, err = run("combine", f"{lora}:0.5", f"{tmp_path / 'r.safetensors'}:0.5", "--out", tmp_path / "c.safetensors",
                         "--json", "--quiet")
    assert code == 0 and json.loads(out.strip().splitlines()[-2])["operation"] == "combine"
    # A refusal is one sentence naming the file, exit 2.
    code, out, err = run("resize", tmp_path / "m.safetensors", "--rank", "4", "--out", tmp_path / "no.safetensors")
    assert code == 2 and "m.safetensors' is a model checkpoint" in err and "Traceback" not in err
    code, out, err = run("combine", lora, "--mode", "svd", "--out", tmp_path / "no.safetensors")
    assert code == 2 and "--rank" in err
    assert not (tmp_path / "no.safetensors").exists()


# --- the web UI's service -------------------------------------------------------------------------------------
def test_ui_service_tools_stay_inside_the_access_policy(tiny, tmp_path):
    import shutil

    from sdlora.config.train_config import ConfigError
    from sdlora.ui.services import Services

    models, out_root = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    service = Services(output_root=out_root, presets_dir=tmp_path, model_roots=[models])
    lora = make_lora(tiny, models / "style.safetensors", rank=4)
    seen = []
    result = service.tools.resize(str(lora), rank=2, name="../../escape", progress=lambda d, t, w: seen.append((d, t)))
    assert result.path == out_root / "tools" / "escape.safetensors" and result.path.is_file()
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0  # progress from the first module to the end
    outside = make_lora(tiny, tmp_path / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match="outside the output folder and the model folders"):
        service.tools.resize(str(outside), rank=2)
    with pytest.raises(ConfigError, match="outside the output folder"):
        service.tools.combine([(str(lora), 1.0), (str(outside), 1.0)])
    combined = service.tools.combine([(str(lora), 0.5), (str(result.path), 0.5)], name="both")  # outputs are usable inputs
    assert combined.path == out_root / "tools" / "both.safetensors"
    merged = service.tools.merge("builtin:tiny", [(str(lora), 1.0)], precision="fp32", name="merged")
    assert merged.path == out_root / "tools" / "merged.safetensors"
    assert str(merged.path) not in service.loras.list_loras()  # a checkpoint, not offered as a LoRA
    with pytest.raises(ConfigError, match="base_model: .* outside the folders this server may load models from"):
        service.tools.merge(str(tmp_path / "model.safetensors"), [(str(lora), 1.0)])
    # A fine-tuned model is loaded only from a model root: the merged checkpoint is one once it is put there.
    with pytest.raises(ConfigError, match="outside the folders this server may load models from"):
        service.tools.extract(str(merged.path), "builtin:tiny", rank=4)
    shutil.copy(merged.path, models / "tuned.safetensors")
    extracted = service.tools.extract(str(models / "tuned.safetensors"), "builtin:tiny", rank=64, conv_rank=64,
                                     precision="fp32")
    weights = _weights(tiny)
    want, got = deltas(lora, weights), deltas(extracted.path, weights)
    assert set(got) == set(want) and max(rel(got[p], want[p]) for p in want) <= 1e-5


def test_tools_tab_endpoints(tiny, tmp_path):
    from gradio_client import Client
    from ui_helpers import app_in_process

    models = tmp_path / "models"
    models.mkdir()
    lora = make_lora(tiny, models / "style.safetensors", rank=4)
    outside = make_lora(tiny, tmp_path / "elsewhere.safetensors")
    with app_in_process(tmp_path / "out", ["--model-root", str(models)]) as (url, service):
        client = Client(url, verbose=False)
        # The base-model field holds the demo's model: a plain LoRA is resized without it.
        path, report = client.predict(source=str(lora), rank=2, method="sv_fro", param=0.99, name="small",
                                      api_name="/tool_resize")
        assert path.endswith("small.safetensors") and "kept" in report and "lora_unet_" in report
        assert rank_of(service.output_root / "tools" / "small.safetensors", "lora_unet_mid_block_attentions_0_"
                       "transformer_blocks_0_attn1_to_q") <= 2
        path, report = client.predict(base_model="builtin:tiny", loras=f"{lora}:0.5", name="baked", api_name="/tool_merge")
        assert path.endswith("baked.safetensors") and "style.safetensors at 0.5" in report
        with pytest.raises(Exception, match="outside the output folder and the model folders"):
            client.predict(sources=f"{lora}:1\n{outside}:1", api_name="/tool_combine")

