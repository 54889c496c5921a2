"""What a run trains on: subsets and datasets as kohya defines them, and the images expanded by their repeats into
entries, each with the bucket size it is trained at."""

from __future__ import annotations

from dataclasses import dataclass

from .buckets import assign_bucket, make_buckets, own_size_bucket


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
    tag_dropout: float = 0.0  # kohya's caption_tag_dropout_rate
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


@dataclass
class Entries:
    entries: list[Entry]
    num_train_samples: int  # train images x repeats
    num_reg_images: int  # kohya's num_reg_images: reg images x their own repeats, before balancing


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


def _bucket_size(item, group: Group, buckets) -> tuple[int, int]:
    if not buckets:
        return group.resolution, group.resolution
    if group.bucket_no_upscale and item.width * item.height < group.resolution ** 2:
        return own_size_bucket(item.width, item.height, group.resolution)
    return assign_bucket(item.width, item.height, buckets)


def build_entries(items, subsets: list[Subset], item_subsets: list[int], groups: list[Group]) -> Entries:
    """Train items first, then reg items, each repeated; reg repeats balanced per dataset to its train samples."""
    bucket_lists = [make_buckets(g.resolution, step=g.bucket_reso_steps, min_size=g.min_bucket_reso,
                                 max_size=g.max_bucket_reso) if g.enable_buckets else None for g in groups]
    train_idx = [i for i in range(len(items)) if not subsets[item_subsets[i]].is_reg]
    reg_idx = [i for i in range(len(items)) if subsets[item_subsets[i]].is_reg]
    repeats = {i: max(1, items[i].repeats) for i in train_idx}
    num_train_samples = sum(repeats.values())
    num_reg_images = sum(max(1, items[i].repeats) for i in reg_idx)
    for g in range(len(groups)):  # kohya balances each [[datasets]] block (DreamBoothDataset) on its own
        g_train = sum(repeats[i] for i in train_idx if subsets[item_subsets[i]].group == g)
        g_reg = [i for i in reg_idx if subsets[item_subsets[i]].group == g]
        repeats.update(zip(g_reg, balance_reg_repeats(g_train, [max(1, items[i].repeats) for i in g_reg])))
    entries: list[Entry] = []
    for i in train_idx + reg_idx:
        sub = subsets[item_subsets[i]]
        size = _bucket_size(items[i], groups[sub.group], bucket_lists[sub.group])
        entries.extend(Entry(i, size, sub.group, sub.is_reg) for _ in range(repeats[i]))
    return Entries(entries, num_train_samples, num_reg_images)
