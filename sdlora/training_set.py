"""What the loop trains on: images expanded by repeats, bucketed batches, cached latents and text embeddings.

Every random choice (order, crop, flip, caption shuffle/dropout) is derived from (seed, epoch, index), so a
resumed run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fileio import atomic_path
from .data.buckets import assign_bucket, bucket_batches, make_buckets, own_size_bucket
from .data.captions import build_caption
from .data.images import load_training_image


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256(repr(parts).encode()).digest())


@dataclass
class Entry:
    item_index: int
    size: tuple[int, int]  # (w, h) after bucketing


class TrainingSet:
    def __init__(self, items, *, resolution: int, enable_buckets: bool, center_crop: bool, random_flip: bool, seed: int,
                 trigger_word: str = "", shuffle_tags: bool = False, keep_tokens: int = 0, caption_dropout: float = 0.0,
                 default_caption: str = "", bucket_no_upscale: bool = False):
        self.items = items
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_options = dict(trigger_word=trigger_word or None, shuffle_tags=shuffle_tags, keep_tokens=keep_tokens,
                                    caption_dropout=caption_dropout)
        self.default_caption = default_caption
        buckets = make_buckets(resolution) if enable_buckets else None
        self.entries: list[Entry] = []
        for i, item in enumerate(items):
            if not buckets:
                size = (resolution, resolution)
            elif bucket_no_upscale and item.width * item.height < resolution * resolution:
                size = own_size_bucket(item.width, item.height, resolution)
            else:
                size = assign_bucket(item.width, item.height, buckets)
            self.entries.extend(Entry(i, size) for _ in range(max(1, item.repeats)))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def captions_vary(self) -> bool:
        o = self.caption_options
        return bool(o["shuffle_tags"] or o["caption_dropout"] > 0)

    def batches_for_epoch(self, epoch: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        keys = [e.size for e in self.entries]
        batches = bucket_batches(keys, batch_size, rng=_rng(self.seed, "order", epoch))
        if num_processes > 1:
            # Every process gets the same number of batches so DDP steps stay in lock-step.
            usable = len(batches) - len(batches) % num_processes
            batches = batches[:usable][process_index::num_processes]
        return batches

    def flip_for(self, epoch: int, index: int) -> bool:
        return self.random_flip and _rng(self.seed, "flip", epoch, index).random() < 0.5

    def caption_for(self, epoch: int, index: int) -> str:
        item = self.items[self.entries[index].item_index]
        raw = item.caption or self.default_caption
        return build_caption(raw, rng=_rng(self.seed, "caption", epoch, index), **self.caption_options)

    def fixed_caption(self, item_index: int) -> str:
        """The caption with trigger word but no shuffle/dropout (what the text cache stores)."""
        item = self.items[item_index]
        return build_caption(item.caption or self.default_caption, trigger_word=self.caption_options["trigger_word"])

    def pixels_for(self, epoch: int, index: int, *, flip: bool) -> torch.Tensor:
        entry = self.entries[index]
        item = self.items[entry.item_index]
        crop = "center" if self.center_crop else "random"
        return load_training_image(item.path, entry.size, crop=crop, flip=flip, rng=_rng(self.seed, "crop", epoch, index))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LatentCache:
    """VAE latents per (image, size, flip), in memory and optionally on disk.

    The disk key covers the file's content, the target size, the flip and the VAE identity, so a changed
    image or another model is re-encoded instead of silently reusing stale latents.
    """

    def __init__(self, vae, *, vae_id: str, cache_dir: Path | None, device, dtype=torch.float32):
        self.vae = vae
        self.vae_id = vae_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = device
        self.dtype = dtype
        self.memory: dict[tuple[int, bool], torch.Tensor] = {}
        self.hits = 0
        self._digests: dict[Path, str] = {}
        self.encoded = 0

    def key(self, path: Path, size, flip: bool) -> str:
        if path not in self._digests:  # read each file once, not once per flip variant
            self._digests[path] = file_digest(path)
        return hashlib.sha256(f"{self._digests[path]}|{size[0]}x{size[1]}|{int(flip)}|{self.vae_id}".encode()).hexdigest()[:32]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        # The distribution mean: deterministic, so cached and uncached runs agree.
        return (dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    def build(self, dataset: TrainingSet, *, flips: tuple[bool, ...], progress=None, batch_size: int = 4) -> None:
        """Encode every (item, flip) once; entries of the same item share its latents."""
        todo: list[tuple[int, bool, int, str | None]] = []
        seen = set()
        for idx, entry in enumerate(dataset.entries):
            for flip in flips:
                if (entry.item_index, flip) in seen:
                    continue
                seen.add((entry.item_index, flip))
                item = dataset.items[entry.item_index]
                disk_key = self.key(item.path, entry.size, flip) if self.cache_dir else None
                if disk_key and (self.cache_dir / f"{disk_key}.safetensors").is_file():
                    try:
                        self.memory[(entry.item_index, flip)] = load_file(self.cache_dir / f"{disk_key}.safetensors")["latent"]
                        self.hits += 1
                        continue
                    except Exception:
                        pass  # unreadable cache file: re-encode below
                todo.append((entry.item_index, flip, idx, disk_key))
        # Group by size so each VAE call is one batch.
        by_size: dict[tuple[int, int], list] = {}
        for t in todo:
            by_size.setdefault(dataset.entries[t[2]].size, []).append(t)
        done = 0
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start: start + batch_size]
                pixels = torch.stack([dataset.pixels_for(0, idx, flip=flip) for _, flip, idx, _ in chunk])
                latents = self.encode(pixels).cpu()
                for (item_index, flip, _, disk_key), latent in zip(chunk, latents):
                    self.memory[(item_index, flip)] = latent.clone()
                    if disk_key:
                        self._save(disk_key, latent)
                self.encoded += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, len(todo))

    def _save(self, disk_key: str, latent: torch.Tensor) -> None:
        with atomic_path(self.cache_dir / f"{disk_key}.safetensors") as tmp:
            save_file({"latent": latent.contiguous()}, str(tmp))

    def get(self, item_index: int, flip: bool) -> torch.Tensor:
        return self.memory[(item_index, flip)]


class TextEmbeddingCache:
    """Caption -> encoder hidden states, for a frozen text encoder. Captions that vary per step are encoded on the fly."""

    def __init__(self, tokenizer, text_encoder, device):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.memory: dict[str, torch.Tensor] = {}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        # Over-long captions are truncated to CLIP's 77 positions; the dataset scan already warned about them.
        max_len = self.tokenizer.model_max_length
        return self.tokenizer(captions, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids

    def encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def get(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memory]
        if missing:
            for c, emb in zip(missing, self.encode(missing)):
                self.memory[c] = emb
        return torch.stack([self.memory[c] for c in captions])
