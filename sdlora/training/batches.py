"""What each optimizer step reads: its samples (a pure function of the step, so a resumed run reads exactly what an
uninterrupted one would), their latents and conditioning, loss weights and masks.

`run` is the prepared Trainer: its config, dataset, step plan, caches and accelerator.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ..data.caches import LatentCache
from ..families import Conditioning


def open_readers(run) -> None:
    """The VAE encoder for uncached images and the worker threads that decode them one micro-batch ahead."""
    run.encoder = LatentCache(run.base.vae, vae_id="", cache_dir=None, device=run.device)
    run.loader = ThreadPoolExecutor(max_workers=max(1, run.config.num_workers), thread_name_prefix="sdlora-data")
    run.epoch_batches, run.prefetched = {}, {}


def position_at(run, step: int) -> None:
    """Reset the data position to optimizer step `step` (start, resume, benchmarks)."""
    run.epoch_batches = {}
    run.prefetched = {}
    run.epoch = step // run.steps_per_epoch


def indices(run, step: int, micro: int) -> tuple[int, list[int]]:
    """(epoch, sample indices) of micro-batch `micro` of optimizer step `step`."""
    cfg, acc = run.config, run.accelerator
    epoch = step // run.steps_per_epoch
    if epoch not in run.epoch_batches:
        run.epoch_batches = {epoch: run.dataset.batches_for_epoch(epoch, cfg.batch_size, process_index=acc.process_index,
                                                                  num_processes=acc.num_processes)}
    batches = run.epoch_batches[epoch]
    return epoch, batches[((step % run.steps_per_epoch) * cfg.grad_accum + micro) % len(batches)]


def pixels(run, epoch: int, sample_indices: list[int]) -> torch.Tensor:
    ds = run.dataset
    images = torch.stack([ds.pixels_for(epoch, i, flip=ds.flip_for(epoch, i)) for i in sample_indices])
    return images.pin_memory() if run.device.type == "cuda" else images


def batch(run, epoch: int, sample_indices: list[int], images: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning]:
    """Latents and conditioning of these samples: cached latents or freshly encoded `images`, cached or encoded captions."""
    ds = run.dataset
    flips = [ds.flip_for(epoch, i) for i in sample_indices]
    if run.latents is not None:
        latents = torch.stack([run.latents.get(ds.entries[i].item_index, f) for i, f in zip(sample_indices, flips)])
        latents = latents.to(run.device, non_blocking=True)
    else:
        if images is None:
            images = pixels(run, epoch, sample_indices)
        latents = run.encoder.encode(images.to(run.device, non_blocking=True))
    captions = [ds.caption_for(epoch, i) for i in sample_indices]
    if run.trained_te:
        text = run.text_cache.encode(captions)
    elif run.shuffles_captions:
        with torch.no_grad():
            text = run.text_cache.encode(captions)  # too many variants to cache
    else:
        text = run.text_cache.get(captions)
    geometries = [ds.geometry_for(epoch, i, flip=f) for i, f in zip(sample_indices, flips)]
    return latents, run.family.conditioning(text, geometries)


def next_batch(run, step: int, micro: int) -> tuple[torch.Tensor, Conditioning]:
    epoch, chosen = indices(run, step, micro)
    run.epoch = epoch
    images = None
    if run.latents is None:
        # Uncached images are decoded in worker threads one micro-batch ahead, so the step never waits on Pillow.
        future = run.prefetched.pop((step, micro), None)
        images = future.result() if future else pixels(run, epoch, chosen)
        nxt = (step, micro + 1) if micro + 1 < run.config.grad_accum else (step + 1, 0)
        if nxt[0] < run.total_steps:
            n_epoch, n_indices = indices(run, *nxt)
            run.prefetched = {nxt: run.loader.submit(pixels, run, n_epoch, n_indices)}
    return batch(run, epoch, chosen, images)


def loss_weights(run, step: int, micro: int) -> torch.Tensor | None:
    """Per-sample loss weights of a micro-batch; None when every sample weighs 1 (no reg images)."""
    if not run.dataset.num_reg_samples or run.dataset.prior_loss_weight == 1.0:
        return None
    _, chosen = indices(run, step, micro)
    return torch.tensor([run.dataset.loss_weight(i) for i in chosen], dtype=torch.float32)


def loss_masks(run, step: int, micro: int) -> torch.Tensor | None:
    """Masked loss: the micro-batch's masks (B x 1 x H x W at pixel size), read from the files with each sample's
    crop and flip; None when no subset uses masked loss."""
    ds = run.dataset
    if not ds.uses_masks:
        return None
    epoch, chosen = indices(run, step, micro)
    return torch.stack([ds.mask_for(epoch, i, flip=ds.flip_for(epoch, i)) for i in chosen])
