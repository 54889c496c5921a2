"""The fast LoCon/DoRA, LoKr and LoHa forwards (sdlora/adapters/fast_*.py) against LyCORIS's own modules, the
reference: the same output and the same gradients for every parameter and the input (fp32 to 1e-6; a parameter
gradient that is a sum over every output element -- LoKr's w1 -- may instead be within 1.5e-6 of an fp64 run, as its
summation order differs from the reference's; bf16 at least as close to an fp64 run as the reference is), on Linear, 1x1 and 3x3 (and strided) convs, Tucker cores, strength ≠ 1,
seeded rank and module dropout; the same parameter names and file tensors; and no full-size weight kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdlora.adapters.lycoris_layer import lycoris_class

LAYERS = {
    "linear": lambda: nn.Linear(64, 48),
    "conv1x1": lambda: nn.Conv2d(32, 48, 1),
    "conv3x3": lambda: nn.Conv2d(32, 48, 3, padding=1),
    "conv3x3-stride2": lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1),
}
# (network, LyCORIS options, the layers it runs on)
CASES = {
    "locon": ("locon", dict(lora_dim=4, alpha=2.0), list(LAYERS)),
    "locon-tucker": ("locon", dict(lora_dim=4, alpha=2.0, use_tucker=True), ["conv3x3", "conv3x3-stride2"]),
    "dora": ("locon", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), list(LAYERS)),
    "dora-tucker": ("locon", dict(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False, use_tucker=True),
                    ["conv3x3"]),
    "lokr": ("lokr", dict(lora_dim=2, alpha=1.0, factor=4), list(LAYERS)),
    "lokr-full": ("lokr", dict(lora_dim=2, alpha=1.0, factor=4, full_matrix=True), list(LAYERS)),
    "lokr-tucker": ("lokr", dict(lora_dim=2, alpha=1.0, factor=4, use_tucker=True), ["conv3x3", "conv3x3-stride2"]),
    "lokr-both": ("lokr", dict(lora_dim=2, alpha=1.0, factor=8, decompose_both=True), ["linear", "conv3x3"]),
    "loha": ("loha", dict(lora_dim=4, alpha=2.0), list(LAYERS)),
    "loha-tucker": ("loha", dict(lora_dim=4, alpha=2.0, use_tucker=True), ["conv3x3", "conv3x3-stride2"]),
}
PARAMS = [pytest.param(case, layer, id=f"{case}-{layer}") for case, (_, _, layers) in CASES.items() for layer in layers]
# The factor ΔW is linear in, scaled so that ‖ΔW‖ = ‖W‖/2: a trained adapter, and one whose error would show.
_LINEAR_FACTOR = {"locon": "lora_up.weight", "loha": "hada_w1_a", "lokr": None}


def _input(layer_name: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    shape = (2, 7, 64) if layer_name == "linear" else (2, 32, 9, 9)
    return torch.randn(shape, generator=g).to(dtype)


def _pair(case: str, layer_name: str, **extra):
    """(reference, fast) modules on one frozen layer, with the same trained-looking parameters."""
    network, options, _ = CASES[case]
    torch.manual_seed(0)
    layer = LAYERS[layer_name]().requires_grad_(False)
    ref = lycoris_class(network, reference=True)("t", layer, **options, **extra)
    fast = lycoris_class(network, reference=False)("t", layer, **options, **extra)
    assert type(fast) is not type(ref) and isinstance(fast, type(ref))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if name == "dora_scale"
                    else 0.3 * torch.randn(p.shape, generator=g))
        name = _LINEAR_FACTOR[network] or ("lokr_w1" if ref.use_w1 else "lokr_w1_a")
        ref.eval()
        ratio = ref.get_diff_weight(shape=ref.shape)[0].norm() / layer.weight.norm()
        ref.get_parameter(name).mul_(0.5 / ratio)
    fast.load_state_dict(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), fast.parameters()))
    return ref, fast, layer


def _run(module, x, seed=5, autocast=None):
    """Output and gradients (input, every parameter) of a fixed random projection of the output."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        y = module(x)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    (y.float() * proj).sum().backward()
    return {"y": y.detach().float(), "x": x.grad.float(),
            **{n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None}}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_same(got: dict, want: dict, tol: float):
    assert got.keys() == want.keys()
    errors = {k: _rel(got[k], want[k]) for k in want}
    assert max(errors.values()) <= tol, errors


def _assert_fp32_exact(got: dict, want: dict, truth: dict):
    """Output and input gradient to 1e-6 of the reference; each parameter gradient to 1e-6 of the reference or to
    1.5e-6 of fp64 (see the module docstring)."""
    _assert_same({k: got[k] for k in ("y", "x")}, {k: want[k] for k in ("y", "x")}, 1e-6)
    for key in want:
        assert _rel(got[key], want[key]) <= 1e-6 or _rel(got[key], truth[key]) <= 1.5e-6, \
            (key, _rel(got[key], want[key]), _rel(got[key], truth[key]))


def _fp64_copy(module):
    """The module and its frozen layer in fp64: the truth both fp32/bf16 paths are measured against."""
    twin = copy.deepcopy(module)
    twin.org_module = [copy.deepcopy(module.org_module[0])]
    twin.org_forward = twin.org_module[0].forward
    _to((twin,), torch.float64)
    return twin


def _to(modules, dtype):
    for m in modules:
        m.to(dtype)
        m.org_module[0].to(dtype)


@pytest.mark.parametrize("case,layer_name", PARAMS)
def test_fast_path_matches_the_reference_in_fp32(case, layer_name):
    ref, fast, layer = _pair(case, layer_name)
    _to((ref, fast), torch.float32)
    truth_module = _fp64_copy(ref)
    x = _input(layer_name)
    for strength in (1.0, 0.6):
        ref.multiplier = fast.multiplier = truth_module.multiplier = strength
        got, want = _run(fast, x), _run(ref, x)
        _assert_fp32_exact(got, want, _run(truth_module, x.double()))
        # the adapter's own part of the output, not only the sum with the frozen layer
        base = layer(x)
        assert _rel(got["y"] - base, want["y"] - base) <= 1e-6


@pytest.mark.parametrize("case,layer_name", PARAMS)
def test_fast_path_in_bf16_is_as_close_to_fp64_as_the_reference(case, layer_name):
    """Frozen layer in bf16, adapter fp32, under autocast (as training runs); fp64 reference as the truth."""
    ref, fast, _ = _pair(case, layer_name)
    truth_module = _fp64_copy(ref)
    x = _input(layer_name)
    truth = _run(truth_module, x.double())
    for m in (ref, fast):
        m.org_module[0].to(torch.bfloat16)
    want = _run(ref, x.to(torch.bfloat16), autocast=torch.bfloat16)
    got = _run(fast, x.to(torch.bfloat16), autocast=torch.bfloat16)
    for key in truth:
        ref_err, fast_err = _rel(want[key], truth[key]), _rel(got[key], truth[key])
        assert fast_err <= max(1.5 * ref_err, 2e-2), (key, fast_err, ref_err)


@pytest.mark.parametrize("case,layer_name", [p for p in PARAMS if p.values[1] in ("linear", "conv3x3")])
def test_seeded_rank_and_module_dropout_draw_and_apply_as_the_reference(case, layer_name):
    ref, fast, layer = _pair(case, layer_name, rank_dropout=0.4, module_dropout=0.5)
    _to((ref, fast), torch.float32)
    truth_module = _fp64_copy(ref)
    for m in (ref, fast, truth_module):
        m.train()
    x = _input(layer_name)
    dropped = kept = 0
    for seed in range(6):
        want, got = _run(ref, x, seed), _run(fast, x, seed)
        _assert_fp32_exact(got, want, _run(truth_module, x.double(), seed))
        if torch.equal(want["y"], layer(x)):
            dropped += 1
        else:
            kept += 1
    assert dropped and kept  # both module-dropout branches were compared
    for m in (ref, fast, truth_module):  # no dropout at all in eval mode
        m.eval()
    _assert_fp32_exact(_run(fast, x), _run(ref, x), _run(truth_module, x.double()))


def _saved_bytes(module, x) -> tuple[int, int]:
    """(bytes autograd keeps for backward beyond the frozen weights and the input, the largest such tensor's numel)."""
    own = {t.untyped_storage().data_ptr() for t in (*module.org_module[0].parameters(), x)}
    seen: dict[int, int] = {}
    largest = 0

    def pack(t):
        nonlocal largest
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.sum().backward()
    return sum(seen.values()), largest


@pytest.mark.parametrize("case,layer_name", [p for p in PARAMS if p.values[1] in ("linear", "conv3x3")])
def test_fast_path_keeps_no_full_size_weight_or_second_input_for_backward(case, layer_name):
    ref, fast, layer = _pair(case, layer_name)
    _to((ref, fast), torch.float32)
    x = _input(layer_name).requires_grad_(True)
    ref_bytes, ref_largest = _saved_bytes(ref, x)
    fast_bytes, fast_largest = _saved_bytes(fast, x)
    weight = layer.weight.numel()
    assert ref_largest >= weight  # the reference keeps ΔW or W + ΔW
    # Beyond the input itself, nothing input-sized (DoRA's x ⊙ s, LoKr's grouped products) or weight-sized: what
    # a LoRA layer keeps (its rank-sized intermediate) and tensors of the factors' size.
    assert fast_largest < min(weight, x.numel()) and fast_bytes < ref_bytes, (fast_bytes, ref_bytes, fast_largest)


def test_fast_modules_keep_the_reference_parameters_file_tensors_and_spec_plumbing(monkeypatch):
    from sdlora.adapters.fast_common import REFERENCE_ENV
    from sdlora.adapters.spec import AdapterSpec

    for case, (network, options, layers) in CASES.items():
        for layer_name in layers:
            ref, fast, _ = _pair(case, layer_name)
            assert [(n, p.shape) for n, p in ref.named_parameters()] == \
                   [(n, p.shape) for n, p in fast.named_parameters()]
            a, b = ref.custom_state_dict(), fast.custom_state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spec = AdapterSpec(network="lokr", rank=4, lokr_factor=4)
    layer = nn.Linear(64, 48)
    assert type(spec._lycoris_module("m", layer, "linear")).__name__ == "FastLokrModule"
    monkeypatch.setenv(REFERENCE_ENV, "1")
    assert type(spec._lycoris_module("m", layer, "linear")).__name__ == "LokrModule"
    monkeypatch.delenv(REFERENCE_ENV)
    dora = AdapterSpec(network="lora", rank=4, dora=True)
    meta = dora._lycoris_module("m", nn.Linear(64, 48, device="meta"), "linear")  # the memory trace's modules
    assert type(meta).__name__ == "FastLoConModule" and meta.dora_scale.shape == (1, 64)


def test_layers_the_fast_math_does_not_cover_run_the_reference_forward():
    """A grouped conv and DoRA with the norm per output row have no exact fast path here: same result as LyCORIS."""
    torch.manual_seed(0)
    grouped = nn.Conv2d(32, 48, 3, padding=1, groups=2).requires_grad_(False)
    for network, layer, options in (("locon", grouped, dict(lora_dim=4)),
                                    ("locon", nn.Linear(64, 48).requires_grad_(False),
                                     dict(lora_dim=4, weight_decompose=True, wd_on_out=True))):
        ref = lycoris_class(network, reference=True)("t", layer, **options)
        fast = lycoris_class(network, reference=False)("t", layer, **options)
        assert not fast._fast_ok()
        with torch.no_grad():
            ref.lora_up.weight.normal_()
        fast.load_state_dict(ref.state_dict())
        x = _input("linear" if isinstance(layer, nn.Linear) else "conv3x3")
        _assert_same(_run(fast, x), _run(ref, x), 0.0)


def test_dora_follows_a_changed_frozen_weight():
    """DoRA keeps ‖W_c‖² between steps; a weight changed in place (a merge, a reload) must not leave it stale."""
    ref, fast, layer = _pair("dora", "conv3x3")
    x = _input("conv3x3")
    _assert_same(_run(fast, x), _run(ref, x), 1e-6)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    _assert_same({k: v for k, v in _run(fast, x).items() if k in ("y", "x")},
                 {k: v for k, v in _run(ref, x).items() if k in ("y", "x")}, 1e-6)
