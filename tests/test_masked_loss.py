"""Masked loss: masks follow the pixels' resize/crop/flip, and masked-out latents do not change the loss."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config.train_config import make_config
from sdlora.data.images import ImageLoadError
from sdlora.training.objective import masked_mean
from sdlora.training.trainer import Trainer
from sdlora.data.plan import build_training_data


def _stub_trainer(masked: bool = True) -> Trainer:
    """A Trainer with just what _loss needs; the "UNet" returns its input, so each latent pixel's loss depends on that
    pixel only (with a real UNet every output pixel sees every input pixel)."""
    from diffusers import DDPMScheduler

    t = Trainer(make_config(base_model="builtin:tiny", data_dir="builtin:demo", masked_loss=masked, seed=3))
    t.accelerator = type("Acc", (), {"process_index": 0, "autocast": staticmethod(contextlib.nullcontext)})()
    t.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    t.prediction_type, t.device, t.weight_dtype, t.unet = "epsilon", torch.device("cpu"), torch.float32, None
    t.family = type("Fam", (), {"unet_forward": staticmethod(lambda unet, noisy, timesteps, cond: noisy)})()
    return t


class _Cond:
    def to(self, *a, **k):
        return self


def test_loss_ignores_latents_where_the_mask_is_black():
    t = _stub_trainer()
    a = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[:, :, :, :4] += 5.0  # differs only in the left half
    mask = torch.ones(2, 1, 64, 64)
    mask[:, :, :, :32] = 0.0  # pixel mask: left half ignored (area-averaged to latent 8x8)
    masked = [t._loss(x, _Cond(), step=1, micro=0, mask=mask) for x in (a, b)]
    plain = [t._loss(x, _Cond(), step=1, micro=0) for x in (a, b)]
    assert torch.equal(masked[0], masked[1])
    assert not torch.allclose(plain[0], plain[1])
    # a full mask is the plain mean; normalised by the mask mean, half a mask keeps the per-pixel scale
    full = t._loss(a, _Cond(), step=1, micro=0, mask=torch.ones(2, 1, 64, 64))
    torch.testing.assert_close(full, plain[0])
    loss = torch.ones(1, 4, 8, 8)
    torch.testing.assert_close(masked_mean(loss, mask[:1]), torch.ones(1))


def _rgba(path: Path, size=(96, 64)):
    """Opaque red in the left third and a top band, transparent elsewhere: asymmetric, so flips and crops show."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, : w // 3] = (255, 0, 0, 255)
    arr[: h // 4, :] = (255, 0, 0, 255)
    Image.fromarray(arr, "RGBA").save(path)


def _agree(mask: torch.Tensor, pixels: torch.Tensor) -> float:
    opaque = pixels[1] < 0  # red (G = -1) where opaque, white (G = +1) where transparent
    return ((mask[0] > 0.5) == opaque).float().mean().item()


def test_mask_follows_the_pixels_crop_and_flip(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        _rgba(data / f"img{i}.png", size=(96 + 32 * i, 64))
        (data / f"img{i}.txt").write_text("a red shape")
    cfg = make_config(data_dir=str(data), resolution=64, masked_loss=True, random_flip=True, cache_latents=False, center_crop=False,
                      seed=1)
    ds = build_training_data(cfg).dataset
    assert ds._crop(0) == "random"
    seen = set()
    for epoch in range(6):
        for k in range(len(ds.entries)):
            flip = ds.flip_for(epoch, k)
            mask, pixels = ds.mask_for(epoch, k, flip=flip), ds.pixels_for(epoch, k, flip=flip)
            assert mask.shape == (1, 64, 64) and pixels.shape == (3, 64, 64)
            assert _agree(mask, pixels) > 0.97, (epoch, k, flip)
            seen.add((flip, ds.geometry_for(epoch, k, flip=flip).crop_top_left))
    assert {f for f, _ in seen} == {True, False} and len(seen) > 3  # flips and several crops were checked


def test_mask_dir_masks_and_size_mismatch_is_refused(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    arr = np.zeros((64, 96), dtype=np.uint8)
    arr[:, :32] = 255
    Image.fromarray(np.stack([arr, np.zeros_like(arr), np.zeros_like(arr)], -1), "RGB").save(data / "a.png")
    Image.fromarray(arr, "L").save(masks / "a.png")
    Image.new("RGB", (64, 64), "blue").save(data / "b.jpg")  # no mask: learned whole
    cfg = make_config(data_dir=str(data), resolution=64, masked_loss=True, mask_dir=str(masks), random_flip=True,
                      cache_latents=False, seed=2)
    td = build_training_data(cfg)
    assert any("1 by a mask file, 1 without a mask" in n for n in td.notes)
    ds = td.dataset
    for epoch in range(3):
        for k, e in enumerate(ds.entries):
            flip = ds.flip_for(epoch, k)
            mask = ds.mask_for(epoch, k, flip=flip)
            if ds.items[e.item_index].path.name == "b.jpg":
                assert torch.equal(mask, torch.ones(1, 64, 64))
            else:
                red = ds.pixels_for(epoch, k, flip=flip)[0] > 0
                assert ((mask[0] > 0.5) == red).float().mean() > 0.97
    Image.new("L", (90, 64), 255).save(masks / "a.png")
    with pytest.raises(ImageLoadError, match=r"Mask file '.*a\.png' does not fit its image: mask is 90x64 but its image "
                                             r"'a\.png' is 96x64"):
        build_training_data(cfg)


def test_alpha_mask_in_dataset_toml_trains_with_cached_latents(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        _rgba(data / f"s{i}.png", size=(64, 64))
        (data / f"s{i}.txt").write_text("a red shape")
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{data.as_posix()}"\n'
                    "alpha_mask = true\n")
    cfg = make_config(base_model="builtin:tiny", dataset_config=str(toml), output_dir=str(tmp_path / "out"), steps=2,
                      rank=2, resolution=64, batch_size=2, seed=4, cache_latents=True)
    assert build_training_data(cfg).dataset.uses_masks
    trainer = Trainer(cfg)
    trainer.prepare()
    result = trainer.run()
    from sdlora.formats.lora_file import read_lora

    _, md = read_lora(result.lora_path)
    assert md["ss_masked_loss"] == "True"
    assert json.loads(md["ss_datasets"])[0]["subsets"][0]["alpha_mask"] is True
