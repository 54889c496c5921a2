"""What the loop trains on: images expanded by repeats, bucketed batches, cached latents and text embeddings.

Every random choice (order, crop, flip, caption shuffle/dropout) is derived from (seed, epoch, index), so a
resumed run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_path
from .buckets import assign_bucket, bucket_batches, make_buckets, own_size_bucket
from .captions import build_caption
from .images import ImageLoadError, crop_box, find_mask_file, load_training_image, load_training_mask
from ..families import SampleGeometry, TextEmbedding


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256(repr(parts).encode()).digest())


@dataclass
class Entry:
    item_index: int
    size: tuple[int, int]  # (w, h) after bucketing
    group: int = 0  # which dataset ([[datasets]] block): batches never mix datasets
    is_reg: bool = False


@dataclass
class Subset:
    """Options of one subset (kohya's [[datasets.subsets]]); items point at their subset by index."""

    name: str = ""
    is_reg: bool = False
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    flip: bool = False
    random_crop: bool = False
    default_caption: str = ""  # kohya's class_tokens: the caption of an image without a caption file
    caption_prefix: str = ""
    caption_suffix: str = ""
    trigger_word: str = ""
    group: int = 0
    image_dir: str = ""
    num_repeats: int = 1
    img_count: int = 0
    masked: bool = False  # masked loss: alpha channel, else the mask file in mask_dir, else a full mask


@dataclass
class Group:
    """One dataset (kohya's [[datasets]]): its own resolution, buckets and batch size."""

    resolution: int
    enable_buckets: bool = False
    bucket_no_upscale: bool = False
    batch_size: int | None = None  # None: the batch size the loop asks for
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64


def balance_reg_repeats(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """kohya's DreamBoothDataset balancing: reg images are registered in order with their own repeats until they reach the
    number of train samples (repeats included); if they fall short, further rounds add one repeat per image, in order,
    until the counts match. Reg images past that point get 0 (unused, as kohya warns)."""
    out = [0] * len(reg_repeats)
    if not reg_repeats or train_samples <= 0:
        return out
    n, first = 0, True
    while n < train_samples:
        for i, r in enumerate(reg_repeats):
            if first:
                out[i] = r
                n += r
            else:
                out[i] += 1
                n += 1
            if n >= train_samples:
                break
        first = False
    return out


class TrainingSet:
    def __init__(self, items, *, resolution: int, enable_buckets: bool, center_crop: bool, random_flip: bool, seed: int,
                 trigger_word: str = "", shuffle_tags: bool = False, keep_tokens: int = 0, caption_dropout: float = 0.0,
                 default_caption: str = "", bucket_no_upscale: bool = False, subsets: list[Subset] | None = None,
                 item_subsets: list[int] | None = None, groups: list[Group] | None = None, prior_loss_weight: float = 1.0,
                 mask_dir: str | Path | None = None):
        """Without `subsets`, every item forms one subset with the options given here (and its own folder repeats).
        With them, `item_subsets[i]` is item i's subset and `groups` the datasets; reg subsets are balanced to the
        train samples as kohya does, and their samples' loss is weighted by prior_loss_weight."""
        self.items = items
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.prior_loss_weight = prior_loss_weight
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir else None
        if subsets is None:
            subsets = [Subset(shuffle_tags=shuffle_tags, keep_tokens=keep_tokens, caption_dropout=caption_dropout,
                              flip=random_flip, random_crop=not center_crop, default_caption=default_caption,
                              trigger_word=trigger_word)]
            item_subsets = [0] * len(items)
        self.subsets = subsets
        self.item_subsets = list(item_subsets or [0] * len(items))
        self.groups = groups or [Group(resolution, enable_buckets, bucket_no_upscale)]
        self.caption_options = dict(trigger_word=trigger_word or None, shuffle_tags=shuffle_tags, keep_tokens=keep_tokens,
                                    caption_dropout=caption_dropout)
        self.default_caption = default_caption
        # Images that became unreadable after the scan: item -> reason, and the item that stands in for each.
        self.unreadable: dict[int, str] = {}
        self._stand_in: dict[int, int] = {}
        self._bad_lock = threading.Lock()
        self.on_unreadable = None  # callback(path, reason, stand-in path) the first time an image fails
        bucket_lists = [make_buckets(g.resolution, step=g.bucket_reso_steps, min_size=g.min_bucket_reso,
                                     max_size=g.max_bucket_reso) if g.enable_buckets else None for g in self.groups]
        train_idx = [i for i in range(len(items)) if not self.subsets[self.item_subsets[i]].is_reg]
        reg_idx = [i for i in range(len(items)) if self.subsets[self.item_subsets[i]].is_reg]
        repeats = {i: max(1, items[i].repeats) for i in train_idx}
        self.num_train_samples = sum(repeats.values())
        self.num_reg_images = sum(max(1, items[i].repeats) for i in reg_idx)  # kohya's num_reg_images: repeats included
        for g in range(len(self.groups)):  # kohya balances each [[datasets]] block (DreamBoothDataset) on its own
            g_train = sum(repeats[i] for i in train_idx if self.subsets[self.item_subsets[i]].group == g)
            g_reg = [i for i in reg_idx if self.subsets[self.item_subsets[i]].group == g]
            repeats.update(zip(g_reg, balance_reg_repeats(g_train, [max(1, items[i].repeats) for i in g_reg])))
        self.entries: list[Entry] = []
        for i in train_idx + reg_idx:
            sub = self.subsets[self.item_subsets[i]]
            group, buckets, item = self.groups[sub.group], bucket_lists[sub.group], items[i]
            if not buckets:
                size = (group.resolution, group.resolution)
            elif group.bucket_no_upscale and item.width * item.height < group.resolution ** 2:
                size = own_size_bucket(item.width, item.height, group.resolution)
            else:
                size = assign_bucket(item.width, item.height, buckets)
            self.entries.extend(Entry(i, size, sub.group, sub.is_reg) for _ in range(repeats[i]))
        self.num_reg_samples = sum(1 for e in self.entries if e.is_reg)

    def __len__(self) -> int:
        return len(self.entries)

    def subset_of(self, index: int) -> Subset:
        return self.subsets[self.item_subsets[self.entries[index].item_index]]

    @property
    def captions_vary(self) -> bool:
        return any(s.shuffle_tags or s.caption_dropout > 0 for s in self.subsets)

    @property
    def any_flip(self) -> bool:
        return any(s.flip for s in self.subsets)

    def loss_weight(self, index: int) -> float:
        return self.prior_loss_weight if self.entries[index].is_reg else 1.0

    def _group_batch_size(self, group: int, batch_size: int) -> int:
        return self.groups[group].batch_size or batch_size

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch (before splitting over processes): per dataset and bucket, ceil(samples / batch size)."""
        counts: dict[tuple, int] = {}
        for e in self.entries:
            counts[(e.group, e.size)] = counts.get((e.group, e.size), 0) + 1
        return sum(math.ceil(n / self._group_batch_size(k[0], batch_size)) for k, n in counts.items())

    def batches_for_epoch(self, epoch: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        rng = _rng(self.seed, "order", epoch)
        if len(self.groups) == 1:
            batches = bucket_batches([e.size for e in self.entries], self._group_batch_size(0, batch_size), rng=rng)
        else:
            batches = []
            for g in range(len(self.groups)):
                idx = [i for i, e in enumerate(self.entries) if e.group == g]
                part = bucket_batches([self.entries[i].size for i in idx], self._group_batch_size(g, batch_size), rng=rng)
                batches += [[idx[j] for j in b] for b in part]
            rng.shuffle(batches)
        if num_processes > 1:
            # Every process gets the same number of batches so DDP steps stay in lock-step.
            usable = len(batches) - len(batches) % num_processes
            batches = batches[:usable][process_index::num_processes]
        return batches

    def flip_for(self, epoch: int, index: int) -> bool:
        return self.subset_of(index).flip and _rng(self.seed, "flip", epoch, index).random() < 0.5

    def _crop(self, index: int) -> str:
        return "random" if self.subset_of(index).random_crop and not self.center_crop else "center"

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
        from .scan import DatasetError

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

    def _raw_caption(self, item_index: int, sub: Subset) -> str:
        item = self.items[item_index]
        text = item.caption or sub.default_caption
        return ", ".join(p for p in (sub.caption_prefix.strip(" ,"), text, sub.caption_suffix.strip(" ,")) if p)

    def caption_for(self, epoch: int, index: int) -> str:
        sub = self.subset_of(index)
        raw = self._raw_caption(self.source_item(self.entries[index].item_index), sub)
        return build_caption(raw, rng=_rng(self.seed, "caption", epoch, index), trigger_word=sub.trigger_word or None,
                             shuffle_tags=sub.shuffle_tags, keep_tokens=sub.keep_tokens, caption_dropout=sub.caption_dropout)

    def fixed_caption(self, item_index: int) -> str:
        """The caption with trigger word but no shuffle/dropout (what the text cache stores)."""
        sub = self.subsets[self.item_subsets[item_index]]
        return build_caption(self._raw_caption(item_index, sub), trigger_word=sub.trigger_word or None)

    def geometry_for(self, epoch: int, index: int, *, flip: bool) -> SampleGeometry:
        """SDXL's size conditioning for a sample, computed from the scan's image size with the same crop choice as
        pixels_for (no decoding): original size, crop offset (mirrored when flipped, as the pixels are), target."""
        entry = self.entries[index]
        item = self.items[self.source_item(entry.item_index)]
        crop = self._crop(index)
        (nw, _nh), (left, top) = crop_box((item.width, item.height), entry.size, crop=crop,
                                          rng=_rng(self.seed, "crop", epoch, index))
        tw, th = entry.size
        if flip:
            left = nw - left - tw
        return SampleGeometry(original_size=(item.height, item.width), crop_top_left=(top, left), target_size=(th, tw))

    @property
    def uses_masks(self) -> bool:
        return any(s.masked for s in self.subsets)

    def mask_file(self, item_index: int) -> Path | None:
        return find_mask_file(self.items[item_index].path, self.mask_dir)

    def mask_for(self, epoch: int, index: int, *, flip: bool) -> torch.Tensor:
        """The sample's loss mask, 1xHxW in [0, 1] at the size of pixels_for, with the same resize, crop (same rng
        draws) and flip: the image's alpha channel, else its mask file in mask_dir, else all ones (also for samples
        of subsets without masked loss). Read from the files at every step, so it works with cached latents."""
        entry = self.entries[index]
        tw, th = entry.size
        if not self.subset_of(index).masked:
            return torch.ones(1, th, tw)
        source = self.source_item(entry.item_index)
        path = self.items[source].path
        mask = load_training_mask(path, entry.size, mask_path=self.mask_file(source), crop=self._crop(index),
                                  flip=flip, rng=_rng(self.seed, "crop", epoch, index))
        return torch.ones(1, th, tw) if mask is None else mask

    def pixels_for(self, epoch: int, index: int, *, flip: bool) -> torch.Tensor:
        """The sample's pixels. An image that no longer loads (deleted, truncated, undecodable) is reported once and
        skipped: the sample takes the image and caption of the next readable item, at this sample's size and crop."""
        entry = self.entries[index]
        crop = self._crop(index)
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
