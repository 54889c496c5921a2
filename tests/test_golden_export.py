"""The same seed exports the same file: keys, tensors and the stable metadata equal the golden exports in
tests/golden/ (written by tests/golden/make_golden.py before the code was reorganised)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import HERE, RUNS, VOLATILE, train_run  # noqa: E402


def _read(path: Path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


@pytest.mark.parametrize("name", list(RUNS))
def test_export_equals_the_golden_file(tmp_path, name):
    tensors, metadata = _read(train_run(name, tmp_path))
    golden, golden_meta = _read(HERE / f"{name}.safetensors")
    assert sorted(tensors) == sorted(golden)
    for key, want in golden.items():
        got = tensors[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        # 4 steps of float32 arithmetic: equal up to the last bits a different CPU kernel may round differently
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (key, (got - want).abs().max().item())
    stable = lambda m: {k: v for k, v in m.items() if k not in VOLATILE}  # noqa: E731
    assert sorted(metadata) == sorted(golden_meta)
    mine, theirs = stable(metadata), stable(golden_meta)
    for key in theirs:
        if key == "ss_network_args":
            assert json.loads(mine[key]) == json.loads(theirs[key])
        else:
            assert mine[key] == theirs[key], key
