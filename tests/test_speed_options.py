"""Speed and memory options end to end on builtin:tiny: 8-bit AdamW (bitsandbytes) and torch.compile."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import torch

from conftest import tiny_config
from sdlora.formats.lora_file import read_lora
from sdlora.training.trainer import Trainer, train


_config = partial(tiny_config, output_name="t", rank=64, alpha=32.0, targets=["attn"], steps=6, lr=1e-3, seed=11,
                  save_precision="fp32")


def test_adamw8bit_trains_keeps_8bit_state_and_resumes_exactly(tmp_path, demo_dataset):
    trainer = Trainer(_config(tmp_path / "full", demo_dataset, optimizer="adamw8bit", save_every=3))
    trainer.prepare()
    before = {n: p.detach().clone() for n, p in trainer.base.unet.named_parameters() if p.requires_grad}
    full = trainer.run()
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == "AdamW8bit"
    states = list(inner.state.values())
    # bitsandbytes keeps 8-bit moments for tensors of 4096+ elements (rank 64 x 64 channels here), fp32 below that.
    assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in states)
    after = dict(trainer.base.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert full.final_loss is not None and torch.isfinite(torch.tensor(full.final_loss))

    stop = threading.Event()
    part = train(_config(tmp_path / "part", demo_dataset, optimizer="adamw8bit", save_every=3), stop_event=stop,
                 on_event=lambda e: stop.set() if e.kind == "checkpoint" and e.step == 3 else None)
    assert part.stopped_early and part.steps == 3
    resumed = train(_config(tmp_path / "part", demo_dataset, optimizer="adamw8bit", save_every=3, resume="latest"))
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow  # torch.compile: about two minutes the first time
def test_compiled_unet_trains_like_eager_and_exports_the_same_keys(tmp_path, demo_dataset):
    """torch.compile on the CPU (inductor, C++): the slowest test here, about two minutes of compiling."""
    common = dict(rank=4, alpha=4.0, steps=3)
    eager = train(_config(tmp_path / "eager", demo_dataset, **common))
    compiled = train(_config(tmp_path / "compiled", demo_dataset, compile=True, **common))
    a, _ = read_lora(eager.lora_path)
    b, _ = read_lora(compiled.lora_path)
    assert a.keys() == b.keys()  # no "_orig_mod." in the exported names
    assert abs(eager.final_loss - compiled.final_loss) < 1e-3
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, demo_dataset):
    """Checkpointing recomputes activations in backward: less memory, same numbers (UNet and text encoder)."""
    common = dict(rank=4, alpha=4.0, steps=3, train_text_encoder=True, targets=["transformer"])
    plain = train(_config(tmp_path / "plain", demo_dataset, **common))
    ckpt = train(_config(tmp_path / "ckpt", demo_dataset, gradient_checkpointing=True, **common))
    a, _ = read_lora(plain.lora_path)
    b, _ = read_lora(ckpt.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_bf16_mixed_precision_keeps_lora_fp32_and_vae_fp32(tmp_path, demo_dataset):
    """The CUDA recipe, run on the CPU: frozen UNet in bf16 under autocast, fp32 LoRA weights, fp32 VAE."""
    from sdlora.tools.verify import verify_lora
    from sdlora.models import load_base_model

    trainer = Trainer(_config(tmp_path, demo_dataset, rank=4, alpha=4.0, steps=4, mixed_precision="bf16",
                              gradient_checkpointing=True))
    trainer.prepare()
    unet = trainer.base.unet
    frozen = {p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
    lora = {p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    assert frozen == {torch.bfloat16} and lora == {torch.float32}
    assert trainer.base.vae.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_B" in n}
    result = trainer.run()
    assert result.final_loss is not None and 0 < result.final_loss < 10
    assert any(not torch.equal(before[n], p) for n, p in unet.named_parameters() if "lora_B" in n)
    assert verify_lora(result.lora_path, load_base_model("builtin:tiny")).ok


def test_precision_can_change_between_runs_in_one_process(tmp_path, demo_dataset):
    """The web UI trains many runs in one process: a bf16 run after an fp32 one (and back) must not be refused."""
    for i, precision in enumerate(["no", "bf16", "no"]):
        result = train(_config(tmp_path / str(i), demo_dataset, rank=4, steps=1, mixed_precision=precision))
        assert result.steps == 1


def test_previews_decode_in_fp32_under_mixed_precision(tmp_path, demo_dataset):
    """The UNet samples under the run's bf16 autocast; the VAE decodes in fp32 (fp16 VAEs overflow to black)."""
    trainer = Trainer(_config(tmp_path, demo_dataset, rank=4, steps=1, mixed_precision="bf16",
                              sample_prompts=["sdlora_mascot, a red circle --s 2"]))
    trainer.prepare()
    seen = []
    conv = trainer.base.vae.decoder.conv_in
    hook = conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        result = trainer.run()
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.float32}
    assert result.samples and result.samples[0].is_file()


def test_owned_model_drops_idle_encoders_and_previews_stay_the_same(tmp_path, demo_dataset):
    """A run that loaded its own model frees the VAE encoder and the frozen text encoder once latents and captions are
    cached; previews from cached prompt embeddings match those of a run on a shared model that keeps both."""
    import numpy as np
    from PIL import Image

    from sdlora.models import load_base_model

    prompts = ["sdlora_mascot, a red circle --s 3 --n blurry", "a blue square --s 3 --l 1"]
    owned = Trainer(_config(tmp_path / "owned", demo_dataset, rank=4, steps=2, sample_prompts=prompts))
    owned.prepare()
    assert owned.base.text_encoder is None and owned.base.vae.encoder is None
    assert owned.base.vae.decoder is not None
    owned_result = owned.run()

    shared_base = load_base_model("builtin:tiny")
    shared = Trainer(_config(tmp_path / "shared", demo_dataset, rank=4, steps=2, sample_prompts=prompts), base=shared_base)
    shared.prepare()
    assert shared_base.text_encoder is not None and shared_base.vae.encoder is not None
    shared_result = shared.run()

    assert len(owned_result.samples) == len(shared_result.samples) == 2
    for a, b in zip(owned_result.samples, shared_result.samples):
        pa, pb = np.asarray(Image.open(a), dtype=np.int16), np.asarray(Image.open(b), dtype=np.int16)
        assert np.abs(pa - pb).max() <= 1, (a, b)
    a, _ = read_lora(owned_result.lora_path)
    b, _ = read_lora(shared_result.lora_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
