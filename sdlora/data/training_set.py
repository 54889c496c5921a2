"""What the loop reads for each sample: pixels, loss mask, SDXL size conditioning, flip and caption.

The entries (images x repeats, bucketed) come from entries.py, the epoch order from sampler.py. Every random choice
is drawn from draws.sample_rng(seed, purpose, epoch, index), so a resumed run sees exactly the data an uninterrupted
run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..families import SampleGeometry
from .captions import build_caption
from .draws import sample_rng
from .entries import Entry, Group, Subset, build_entries
from .images import ImageLoadError, crop_box, find_mask_file, load_training_image, load_training_mask
from .sampler import EpochSampler
from .stand_ins import StandIns


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
        built = build_entries(items, self.subsets, self.item_subsets, self.groups)
        self.entries: list[Entry] = built.entries
        self.num_train_samples = built.num_train_samples
        self.num_reg_images = built.num_reg_images
        self.num_reg_samples = sum(1 for e in self.entries if e.is_reg)
        self.sampler = EpochSampler(self.entries, self.groups, seed)
        self.stand_ins = StandIns(items)
        self.on_unreadable = None  # callback(path, reason, stand-in path) the first time an image fails

    def __len__(self) -> int:
        return len(self.entries)

    def subset_of(self, index: int) -> Subset:
        return self.subsets[self.item_subsets[self.entries[index].item_index]]

    @property
    def captions_vary(self) -> bool:
        return any(s.shuffle_tags or s.caption_dropout > 0 or s.tag_dropout > 0 for s in self.subsets)

    @property
    def any_flip(self) -> bool:
        return any(s.flip for s in self.subsets)

    @property
    def uses_masks(self) -> bool:
        return any(s.masked for s in self.subsets)

    def loss_weight(self, index: int) -> float:
        return self.prior_loss_weight if self.entries[index].is_reg else 1.0

    def num_batches(self, batch_size: int) -> int:
        return self.sampler.num_batches(batch_size)

    def batches_for_epoch(self, epoch: int, batch_size: int, *, process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
        return self.sampler.batches_for_epoch(epoch, batch_size, process_index=process_index, num_processes=num_processes)

    # random choices per sample -------------------------------------------------------------------------------
    def flip_for(self, epoch: int, index: int) -> bool:
        return self.subset_of(index).flip and sample_rng(self.seed, "flip", epoch, index).random() < 0.5

    def _crop(self, index: int) -> str:
        return "random" if self.subset_of(index).random_crop and not self.center_crop else "center"

    def _crop_rng(self, epoch: int, index: int):
        return sample_rng(self.seed, "crop", epoch, index)

    # images that fail mid-run --------------------------------------------------------------------------------
    def source_item(self, item_index: int) -> int:
        """The item whose image and caption stand for `item_index` (see StandIns.source_item)."""
        return self.stand_ins.source_item(item_index)

    def _mark_unreadable(self, item_index: int, reason: str) -> None:
        if not self.stand_ins.mark(item_index, reason):
            return
        stand_in = None
        try:
            stand_in = self.items[self.source_item(item_index)].path
        except ValueError:
            pass
        if self.on_unreadable is not None:
            self.on_unreadable(self.items[item_index].path, reason, stand_in)

    # captions ------------------------------------------------------------------------------------------------
    def raw_caption(self, item_index: int, sub: Subset) -> str:
        """The item's caption (or its subset's default) with the subset's prefix and suffix, before any draw."""
        item = self.items[item_index]
        text = item.caption or sub.default_caption
        return ", ".join(p for p in (sub.caption_prefix.strip(" ,"), text, sub.caption_suffix.strip(" ,")) if p)

    def caption_for(self, epoch: int, index: int) -> str:
        sub = self.subset_of(index)
        raw = self.raw_caption(self.source_item(self.entries[index].item_index), sub)
        return build_caption(raw, rng=sample_rng(self.seed, "caption", epoch, index), trigger_word=sub.trigger_word or None,
                             shuffle_tags=sub.shuffle_tags, keep_tokens=sub.keep_tokens, caption_dropout=sub.caption_dropout,
                             tag_dropout=sub.tag_dropout)

    def fixed_caption(self, item_index: int) -> str:
        """The caption with trigger word but no shuffle/dropout (what the text cache stores)."""
        sub = self.subsets[self.item_subsets[item_index]]
        return build_caption(self.raw_caption(item_index, sub), trigger_word=sub.trigger_word or None)

    # pixels, mask, size conditioning -------------------------------------------------------------------------
    def geometry_for(self, epoch: int, index: int, *, flip: bool) -> SampleGeometry:
        """SDXL's size conditioning for a sample, computed from the scan's image size with the same crop choice as
        pixels_for (no decoding): original size, crop offset (mirrored when flipped, as the pixels are), target."""
        entry = self.entries[index]
        item = self.items[self.source_item(entry.item_index)]
        (nw, _nh), (left, top) = crop_box((item.width, item.height), entry.size, crop=self._crop(index),
                                          rng=self._crop_rng(epoch, index))
        tw, th = entry.size
        if flip:
            left = nw - left - tw
        return SampleGeometry(original_size=(item.height, item.width), crop_top_left=(top, left), target_size=(th, tw))

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
        mask = load_training_mask(self.items[source].path, entry.size, mask_path=self.mask_file(source),
                                  crop=self._crop(index), flip=flip, rng=self._crop_rng(epoch, index))
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
                                           rng=self._crop_rng(epoch, index))
            except (ImageLoadError, OSError, MemoryError, SyntaxError, EOFError) as exc:
                self._mark_unreadable(source, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")
