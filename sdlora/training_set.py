"""What the loop trains on: images expanded by repeats, bucketed batches, cached latents and text embeddings.

Every random choice (order, crop, flip, caption shuffle/dropout) is derived from (seed, epoch, index), so a
resumed run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fileio import atomic_path
from .data.buckets import assign_bucket, bucket_batches, make_buckets, own_size_bucket
from .data.captions import build_caption
from .data.images import ImageLoadError, crop_box, load_training_image
from .families import SampleGeometry, TextEmbedding


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
        # Images that became unreadable after the scan: item -> reason, and the item that stands in for each.
        self.unreadable: dict[int, str] = {}
        self._stand_in: dict[int, int] = {}
        self._bad_lock = threading.Lock()
        self.on_unreadable = None  # callback(path, reason, stand-in path) the first time an image fails
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

    # images that fail mid-run --------------------------------------------------------------------------------
    def source_item(self, item_index: int) -> int:
        """The item whose image and caption stand for `item_index`: itself, or, once its image failed to load, the next
        item (in dataset order, wrapping) whose image still loads. That depends only on which files are readable, so a
        resumed run makes the same choice."""
        with self._bad_lock:
            if item_index not in self.unreadable:
                return item_index
            cached = self._stand_in.get(item_index)
            if cached is not None and cached not in self.unreadable:
                return cached
            n = len(self.items)
            for step in range(1, n):
                j = (item_index + step) % n
                if j not in self.unreadable:
                    self._stand_in[item_index] = j
                    return j
        from .data.scan import DatasetError

        shown = "; ".join(f"{self.items[i].path.name}: {why}" for i, why in list(self.unreadable.items())[:3])
        raise DatasetError(f"No readable images left: every image of the dataset failed to load during training ({shown}). "
                           "Check the dataset folder (a disk or network share that went away?) and resume.")

    def _mark_unreadable(self, item_index: int, reason: str) -> None:
        with self._bad_lock:
            if item_index in self.unreadable:
                return
            self.unreadable[item_index] = reason
        stand_in = None
        try:
            stand_in = self.items[self.source_item(item_index)].path
        except ValueError:
            pass
        if self.on_unreadable is not None:
            self.on_unreadable(self.items[item_index].path, reason, stand_in)

    def caption_for(self, epoch: int, index: int) -> str:
        item = self.items[self.source_item(self.entries[index].item_index)]
        raw = item.caption or self.default_caption
        return build_caption(raw, rng=_rng(self.seed, "caption", epoch, index), **self.caption_options)

    def fixed_caption(self, item_index: int) -> str:
        """The caption with trigger word but no shuffle/dropout (what the text cache stores)."""
        item = self.items[item_index]
        return build_caption(item.caption or self.default_caption, trigger_word=self.caption_options["trigger_word"])

    def geometry_for(self, epoch: int, index: int, *, flip: bool) -> SampleGeometry:
        """SDXL's size conditioning for a sample, computed from the scan's image size with the same crop choice as
        pixels_for (no decoding): original size, crop offset (mirrored when flipped, as the pixels are), target."""
        entry = self.entries[index]
        item = self.items[self.source_item(entry.item_index)]
        crop = "center" if self.center_crop else "random"
        (nw, _nh), (left, top) = crop_box((item.width, item.height), entry.size, crop=crop,
                                          rng=_rng(self.seed, "crop", epoch, index))
        tw, th = entry.size
        if flip:
            left = nw - left - tw
        return SampleGeometry(original_size=(item.height, item.width), crop_top_left=(top, left), target_size=(th, tw))

    def pixels_for(self, epoch: int, index: int, *, flip: bool) -> torch.Tensor:
        """The sample's pixels. An image that no longer loads (deleted, truncated, undecodable) is reported once and
        skipped: the sample takes the image and caption of the next readable item, at this sample's size and crop."""
        entry = self.entries[index]
        crop = "center" if self.center_crop else "random"
        while True:
            source = self.source_item(entry.item_index)
            try:
                return load_training_image(self.items[source].path, entry.size, crop=crop, flip=flip,
                                           rng=_rng(self.seed, "crop", epoch, index))
            except (ImageLoadError, OSError, MemoryError, SyntaxError, EOFError) as exc:
                self._mark_unreadable(source, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")


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
                try:
                    disk_key = self.key(item.path, entry.size, flip) if self.cache_dir else None
                except OSError:  # deleted or unreadable since the scan: pixels_for substitutes it
                    disk_key = None
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
                    # A stand-in's latents (its own image failed to load) never go to disk under the failed image's key.
                    if disk_key and dataset.source_item(item_index) == item_index:
                        self._save(disk_key, latent)
                self.encoded += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, len(todo))

    def _save(self, disk_key: str, latent: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        try:
            with atomic_path(self.cache_dir / f"{disk_key}.safetensors") as tmp:
                save_file({"latent": latent.contiguous()}, str(tmp))
        except Exception:  # noqa: BLE001 - a full disk (OSError, SafetensorError): keep the latents in memory only
            self.cache_dir = None

    def get(self, item_index: int, flip: bool) -> torch.Tensor:
        return self.memory[(item_index, flip)]


class TextEmbeddingCache:
    """Caption -> what the family's text encoders make of it (hidden states, and SDXL's pooled embedding), for frozen
    text encoders. Captions that vary per step are encoded on the fly with `encode`."""

    def __init__(self, family, tokenizers: list, text_encoders: list, device):
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.memory: dict[str, TextEmbedding] = {}

    def encode(self, captions: list[str]) -> TextEmbedding:
        return self.family.encode(self.text_encoders, self.tokenizers, captions, self.device)

    @torch.no_grad()
    def get(self, captions: list[str]) -> TextEmbedding:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memory]
        if missing:
            for c, row in zip(missing, self.encode(missing).rows()):
                self.memory[c] = row
        return TextEmbedding.stack([self.memory[c] for c in captions])
