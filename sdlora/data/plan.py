"""From a TrainConfig to the TrainingSet and the step plan, before any model loads.

Three ways to name the data, as kohya has them: `data_dir` (a folder, kohya's N_name subfolders set repeats),
`reg_data_dir` (regularization images in N_class folders) and `dataset_config` (kohya's dataset TOML with several
datasets and subsets). All three end as one TrainingSet of subsets; the step plan says how many optimizer steps that
makes, and is the very number the loop runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config.train_config import ConfigError, TrainConfig
from .dataset_config import DatasetConfigError, SubsetSpec, folder_subsets, load_dataset_config
from .scan import DatasetError, DatasetReport, scan_dataset
from ..paths import resolve_data_dir
from ..safetext import shown
from .draws import seeded_rng
from .entries import Group, Subset
from .training_set import TrainingSet

DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass
class TrainingData:
    dataset: TrainingSet
    reports: list[tuple[str, DatasetReport]] = field(default_factory=list)  # (what, report) per scanned folder
    notes: list[str] = field(default_factory=list)
    validation: TrainingSet | None = None  # held-out images (validation_split) or validation_dir; never trained on

    @property
    def num_images(self) -> int:
        """Training images (without reg images), each counted once."""
        ds = self.dataset
        return sum(1 for i in range(len(ds.items)) if not ds.subsets[ds.item_subsets[i]].is_reg)

    @property
    def num_reg_images(self) -> int:
        return self.dataset.num_reg_images

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: {subset folder: {tag: count}}, train and reg subsets."""
        from collections import Counter

        from .captions import split_tags

        ds = self.dataset
        tags: dict[str, Counter] = {}
        for i, item in enumerate(ds.items):
            sub = ds.subsets[ds.item_subsets[i]]
            tags.setdefault(sub.name, Counter()).update(split_tags(ds.raw_caption(i, sub)))
        return {k: dict(v) for k, v in tags.items()}

    def summary(self) -> str:
        lines = [report.summary() if what == "data_dir" else f"{what}: " + report.summary() for what, report in self.reports]
        return "\n".join(lines + self.notes)

    def dataset_dirs(self, reg: bool) -> dict[str, dict[str, int]]:
        """kohya's ss_dataset_dirs / ss_reg_dataset_dirs: {folder name: {"n_repeats", "img_count"}}."""
        return {s.name: {"n_repeats": s.num_repeats, "img_count": s.img_count} for s in self.dataset.subsets if s.is_reg == reg}

    def datasets_metadata(self, batch_size: int) -> list[dict]:
        """kohya's ss_datasets: one object per dataset with its subsets."""
        ds, tags = self.dataset, self.tag_frequency
        out = []
        for g_i, group in enumerate(ds.groups):
            subsets = [s for s in ds.subsets if s.group == g_i]
            entries = [e for e in ds.entries if e.group == g_i]
            buckets: dict[tuple[int, int], int] = {}
            for e in entries:
                buckets[e.size] = buckets.get(e.size, 0) + 1
            out.append({
                "is_dreambooth": True,
                "batch_size_per_device": group.batch_size or batch_size,
                "num_train_images": sum(1 for e in entries if not e.is_reg),
                "num_reg_images": sum(s.img_count * s.num_repeats for s in subsets if s.is_reg),
                "resolution": [group.resolution, group.resolution],
                "enable_bucket": group.enable_buckets,
                "min_bucket_reso": group.min_bucket_reso or (group.resolution // 2 if group.enable_buckets else None),
                "max_bucket_reso": group.max_bucket_reso or (group.resolution * 2 if group.enable_buckets else None),
                "tag_frequency": {s.name: tags.get(s.name, {}) for s in subsets},
                "bucket_info": {"buckets": {str(i): {"resolution": list(k), "count": n}
                                            for i, (k, n) in enumerate(sorted(buckets.items()))}},
                "subsets": [{"img_count": s.img_count, "num_repeats": s.num_repeats, "color_aug": False, "flip_aug": s.flip,
                             "random_crop": s.random_crop, "shuffle_caption": s.shuffle_tags, "keep_tokens": s.keep_tokens,
                             "caption_prefix": s.caption_prefix or None, "caption_suffix": s.caption_suffix or None,
                             "image_dir": s.name, "class_tokens": s.default_caption or None, "is_reg": s.is_reg,
                             "alpha_mask": s.masked}
                            for s in subsets],
            })
        return out


def _subset_from_config(cfg: TrainConfig, name: str, *, is_reg: bool, group: int = 0, spec: SubsetSpec | None = None,
                        num_repeats: int = 1, img_count: int = 0) -> Subset:
    def pick(value, default):
        return default if value is None else value

    spec = spec or SubsetSpec(image_dir=Path(name))
    return Subset(
        name=name, is_reg=is_reg, group=group, image_dir=str(spec.image_dir), num_repeats=num_repeats, img_count=img_count,
        shuffle_tags=pick(spec.shuffle_caption, cfg.shuffle_tags), keep_tokens=pick(spec.keep_tokens, cfg.keep_tokens),
        caption_dropout=pick(spec.caption_dropout_rate, cfg.caption_dropout), flip=pick(spec.flip_aug, cfg.random_flip),
        tag_dropout=pick(spec.caption_tag_dropout_rate, cfg.caption_tag_dropout_rate),
        random_crop=pick(spec.random_crop, not cfg.center_crop), default_caption=spec.class_tokens or cfg.default_caption,
        caption_prefix=spec.caption_prefix, caption_suffix=spec.caption_suffix,
        masked=pick(spec.alpha_mask, cfg.masked_loss),
        trigger_word="" if is_reg else cfg.trigger_word)


def _scan_subset(cfg: TrainConfig, spec: SubsetSpec, min_size: int) -> DatasetReport:
    exts = (spec.caption_extension,) if spec.caption_extension else DEFAULT_CAPTION_EXTENSIONS
    try:
        return scan_dataset(spec.image_dir, default_caption=spec.class_tokens or cfg.default_caption, caption_extensions=exts,
                            min_size=min_size, upscale_small=cfg.upscale_small, recursive=spec.recursive)
    except DatasetError as exc:
        raise DatasetConfigError(f"{spec.where}: {exc}") from None


def build_training_data(cfg: TrainConfig) -> TrainingData:
    """Scan every folder the config names and build the TrainingSet. Raises ConfigError/DatasetError (one sentence
    naming the file or folder and the key) for anything that does not fit, before any model is loaded."""
    min_size = 0 if cfg.upscale_small else cfg.resolution
    items, item_subsets, subsets, groups, reports, notes = [], [], [], [], [], []

    def add(spec: SubsetSpec, group: int, report: DatasetReport, *, keep_folder_repeats: bool = False) -> None:
        name = os.path.basename(os.path.normpath(spec.image_dir))
        if not keep_folder_repeats:
            for item in report.items:
                item.repeats = spec.num_repeats or 1
        subsets.append(_subset_from_config(cfg, name, is_reg=spec.is_reg, group=group, spec=spec,
                                           num_repeats=spec.num_repeats or 1, img_count=report.num_images))
        items.extend(report.items)
        item_subsets.extend([len(subsets) - 1] * report.num_images)

    if cfg.dataset_config:
        dc = load_dataset_config(cfg.dataset_config)
        for g_i, ds in enumerate(dc.datasets):
            groups.append(Group(resolution=ds.resolution or cfg.resolution,
                                enable_buckets=cfg.enable_buckets if ds.enable_bucket is None else ds.enable_bucket,
                                bucket_no_upscale=cfg.bucket_no_upscale if ds.bucket_no_upscale is None else ds.bucket_no_upscale,
                                batch_size=ds.batch_size, min_bucket_reso=ds.min_bucket_reso, max_bucket_reso=ds.max_bucket_reso,
                                bucket_reso_steps=ds.bucket_reso_steps or 64))
            if groups[-1].bucket_no_upscale and not groups[-1].enable_buckets:
                raise DatasetConfigError(f"{ds.where}: bucket_no_upscale needs enable_bucket = true.")
            for spec in ds.subsets:
                report = _scan_subset(cfg, spec, min_size)
                reports.append((f"{'reg ' if spec.is_reg else ''}subset '{shown(spec.image_dir)}'", report))
                add(spec, g_i, report)
        if dc.ignored:
            notes.append(f"Dataset config: kohya keys sdlora does not implement, at their default value (no effect): "
                         f"{', '.join(dc.ignored)}.")
    else:
        if not cfg.data_dir:
            raise ConfigError("data_dir: no dataset folder given. Pass --data DIR (a folder of images with .txt captions), "
                              "builtin:demo, or --dataset-config FILE (kohya's dataset TOML).")
        groups.append(Group(cfg.resolution, cfg.enable_buckets, cfg.bucket_no_upscale))
        report = scan_dataset(resolve_data_dir(cfg.data_dir), default_caption=cfg.default_caption, min_size=min_size,
                              upscale_small=cfg.upscale_small)
        reports.append(("data_dir", report))
        # Each kohya N_name folder is a subset (for its metadata); they share the config's options and keep their repeats.
        by_name: dict[str, int] = {}
        for item in report.items:
            name = item.subset or report.root.name
            if name not in by_name:
                by_name[name] = len(subsets)
                subsets.append(_subset_from_config(cfg, name, is_reg=False, num_repeats=item.repeats))
            subsets[by_name[name]].img_count += 1
            items.append(item)
            item_subsets.append(by_name[name])
        if cfg.reg_data_dir:
            for spec in folder_subsets(resolve_data_dir(cfg.reg_data_dir), is_reg=True):
                report = _scan_subset(cfg, spec, min_size)
                reports.append((f"reg folder '{shown(spec.image_dir.name)}'", report))
                add(spec, 0, report)
    val_items, val_item_subsets = [], []
    if cfg.validation_split:
        train_idx = [i for i in range(len(items)) if not subsets[item_subsets[i]].is_reg]
        n_val = round(len(train_idx) * cfg.validation_split)
        if n_val < 1:
            raise ConfigError(f"validation_split: {cfg.validation_split:g} of {len(train_idx)} training image(s) holds out "
                              "no image for validation. Raise validation_split, add images, or set it to 0.")
        if n_val >= len(train_idx):
            raise ConfigError(f"validation_split: {cfg.validation_split:g} of {len(train_idx)} training image(s) holds out "
                              "every image, leaving none to train on. Lower validation_split or add images.")
        held = set(seeded_rng(cfg.seed, "validation-split").sample(train_idx, n_val))
        keep = [i for i in range(len(items)) if i not in held]
        for i in sorted(held):
            val_items.append(items[i])
            val_item_subsets.append(item_subsets[i])
            subsets[item_subsets[i]].img_count -= 1
        items, item_subsets = [items[i] for i in keep], [item_subsets[i] for i in keep]
        notes.append(f"Validation: {n_val} of {len(train_idx)} training images held out (validation_split "
                     f"{cfg.validation_split:g}); they are never trained on.")
    val_subsets = [replace(s, shuffle_tags=False, caption_dropout=0.0, tag_dropout=0.0, flip=False, random_crop=False, is_reg=False)
                   for s in subsets]
    if cfg.validation_dir:
        val_report = scan_dataset(resolve_data_dir(cfg.validation_dir), default_caption=cfg.default_caption,
                                  min_size=min_size, upscale_small=cfg.upscale_small)
        reports.append((f"validation folder '{shown(val_report.root.name)}'", val_report))
        val_subsets.append(replace(_subset_from_config(cfg, val_report.root.name, is_reg=False), shuffle_tags=False,
                                   caption_dropout=0.0, tag_dropout=0.0, flip=False, random_crop=False,
                                   img_count=val_report.num_images))
        val_items = list(val_report.items)
        val_item_subsets = [len(val_subsets) - 1] * len(val_items)
        notes.append(f"Validation: {len(val_items)} images from validation_dir.")
    validation = None
    if val_items:
        for item in val_items:  # each validation image counts once
            item.repeats = 1
        validation = TrainingSet(val_items, resolution=cfg.resolution, enable_buckets=cfg.enable_buckets, center_crop=True,
                                 random_flip=False, seed=cfg.seed, trigger_word=cfg.trigger_word, subsets=val_subsets,
                                 item_subsets=val_item_subsets, groups=groups)
    if cfg.prior_loss_weight != 1.0 and not any(s.is_reg for s in subsets):
        notes.append("prior_loss_weight is set but there are no regularization images: it has no effect.")
    dataset = TrainingSet(items, resolution=cfg.resolution, enable_buckets=cfg.enable_buckets,
                          center_crop=cfg.cache_latents, random_flip=cfg.random_flip, seed=cfg.seed,
                          trigger_word=cfg.trigger_word, subsets=subsets, item_subsets=item_subsets, groups=groups,
                          prior_loss_weight=cfg.prior_loss_weight, mask_dir=cfg.mask_dir or None)
    if dataset.uses_masks:
        notes.append(_check_masks(cfg, dataset))
    if dataset.num_reg_images > dataset.num_train_samples:
        notes.append(f"{dataset.num_reg_images} reg samples for {dataset.num_train_samples} train samples: as kohya does, "
                     "some regularization images are not used.")
    return TrainingData(dataset=dataset, reports=reports, notes=notes, validation=validation)


def _check_masks(cfg: TrainConfig, dataset: TrainingSet) -> str:
    """Refuse a mask_dir that is not a folder or holds a mask whose size differs from its image (headers only);
    returns the note saying where the masks come from."""
    from .images import has_alpha, mask_size_error, open_image

    if cfg.mask_dir and not dataset.mask_dir.is_dir():
        raise ConfigError(f"mask_dir: '{shown(cfg.mask_dir)}' is not a folder. Give the folder of masks named like their "
                          "images, or clear mask_dir.")
    alpha = files = full = 0
    for i, item in enumerate(dataset.items):
        if not dataset.subsets[dataset.item_subsets[i]].masked:
            continue
        try:
            with open_image(item.path) as img:
                if has_alpha(img):
                    alpha += 1
                    continue
                size = img.size
        except ValueError:
            continue  # an unreadable image is reported where the images are read
        mask = dataset.mask_file(i)
        if mask is None:
            full += 1
            continue
        with open_image(mask) as m:
            if m.size != size:
                raise mask_size_error(mask, m.size, item.path, size)
        files += 1
    return (f"Masked loss: {alpha} image(s) masked by their alpha channel, {files} by a mask file, {full} without a "
            "mask (learned whole).")


@dataclass
class StepPlan:
    """How many optimizer steps a run makes, and why: the numbers shown before training and the ones the loop uses."""

    images: int
    train_samples: int  # images x repeats
    reg_images: int
    reg_samples: int  # after kohya's balancing
    batches_per_epoch: int  # all processes together; buckets and datasets make partial batches
    batch_size: int
    grad_accum: int
    num_processes: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def describe(self, seconds_per_step: float | None = None) -> str:
        reg = f" + {self.reg_samples} reg samples ({self.reg_images} reg images balanced)" if self.reg_samples else ""
        procs = f" / {self.num_processes} processes" if self.num_processes > 1 else ""
        epochs = f"{self.epochs:g}" if self.epochs == int(self.epochs) else f"{self.epochs:.2f}"
        text = (f"Step plan: {self.images} images x repeats = {self.train_samples} samples{reg} -> "
                f"{self.batches_per_epoch} batches of up to {self.batch_size}{procs} / accumulation {self.grad_accum} = "
                f"{self.steps_per_epoch} steps per epoch; {epochs} epochs = {self.total_steps} steps")
        if seconds_per_step:
            text += f"; about {_duration(seconds_per_step * self.total_steps)} at {seconds_per_step:.2f} s/step"
        return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def make_step_plan(cfg: TrainConfig, dataset: TrainingSet, num_processes: int = 1) -> StepPlan:
    batches = dataset.num_batches(cfg.batch_size)
    if num_processes > 1 and batches < num_processes:
        raise ConfigError(f"batch_size: the data makes {batches} batch(es) per epoch, fewer than the {num_processes} "
                          "processes; lower batch_size, add images or repeats, or use fewer processes.")
    per_process = batches // num_processes if num_processes > 1 else batches
    per_epoch = max(1, math.ceil(per_process / cfg.grad_accum))
    total = cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs
    sizes = {g.batch_size or cfg.batch_size for g in dataset.groups}
    return StepPlan(images=len({e.item_index for e in dataset.entries if not e.is_reg}),
                    train_samples=dataset.num_train_samples, reg_images=dataset.num_reg_images,
                    reg_samples=dataset.num_reg_samples, batches_per_epoch=batches, batch_size=max(sizes),
                    grad_accum=cfg.grad_accum, num_processes=num_processes, steps_per_epoch=per_epoch, total_steps=total)
