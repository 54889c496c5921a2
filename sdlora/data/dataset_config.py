"""kohya's dataset TOML, read with kohya's own keys: [general], [[datasets]], [[datasets.subsets]].

A subset inherits every option it does not set from its dataset, which inherits from [general], which falls back to
the TrainConfig (as kohya's command-line arguments do). A key kohya does not know is an error naming the file and
the key; a kohya key sdlora does not implement is accepted only at kohya's default value (it changes nothing), and
an error naming it otherwise, so a run never starts with part of its configuration silently dropped.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import UserFileError, read_user_bytes
from ..safetext import shown
from .scan import DatasetError

# Keys sdlora implements: where each may appear (subset options may also stand in [general] and [[datasets]]).
SUBSET_KEYS = ("num_repeats", "caption_extension", "class_tokens", "keep_tokens", "shuffle_caption", "flip_aug",
               "caption_dropout_rate", "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "random_crop",
               "alpha_mask")
SUBSET_ONLY_KEYS = ("image_dir", "is_reg")
DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "bucket_no_upscale", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps")
# kohya keys sdlora does not implement, with kohya's default: accepted (and ignored) at that value only.
UNSUPPORTED_SUBSET_KEYS: dict[str, Any] = {
    "color_aug": False, "face_crop_aug_range": None, "keep_tokens_separator": "", "secondary_separator": None,
    "enable_wildcard": False, "token_warmup_min": 1, "token_warmup_step": 0, "caption_dropout_every_n_epochs": 0,
    "caption_separator": ",", "cache_info": False,
    "custom_attributes": {}, "metadata_file": None, "conditioning_data_dir": None,
}
UNSUPPORTED_DATASET_KEYS: dict[str, Any] = {"network_multiplier": 1.0, "validation_split": 0.0, "validation_seed": None,
                                            "debug_dataset": False}
_SUBSET_ALLOWED = set(SUBSET_KEYS) | set(SUBSET_ONLY_KEYS) | set(UNSUPPORTED_SUBSET_KEYS)
_DATASET_ALLOWED = set(SUBSET_KEYS) | set(DATASET_KEYS) | set(UNSUPPORTED_SUBSET_KEYS) | set(UNSUPPORTED_DATASET_KEYS)
_TYPES = {"num_repeats": int, "keep_tokens": int, "batch_size": int, "min_bucket_reso": int, "max_bucket_reso": int,
          "bucket_reso_steps": int, "caption_extension": str, "class_tokens": str, "caption_prefix": str,
          "caption_suffix": str, "image_dir": str, "shuffle_caption": bool, "flip_aug": bool, "is_reg": bool,
          "enable_bucket": bool, "bucket_no_upscale": bool, "random_crop": bool, "caption_dropout_rate": (int, float),
          "caption_tag_dropout_rate": (int, float), "alpha_mask": bool}


class DatasetConfigError(DatasetError):
    """A dataset TOML that cannot be used; the message names the file and the key."""


@dataclass
class SubsetSpec:
    image_dir: Path
    is_reg: bool = False
    num_repeats: int | None = None  # None: the repeats of kohya's N_name folder names (folder mode)
    caption_extension: str | None = None  # None: sdlora's default (.txt, then .caption)
    class_tokens: str = ""  # the caption of an image without a caption file
    keep_tokens: int | None = None
    shuffle_caption: bool | None = None
    flip_aug: bool | None = None
    caption_dropout_rate: float | None = None
    caption_tag_dropout_rate: float | None = None
    caption_prefix: str = ""
    caption_suffix: str = ""
    random_crop: bool | None = None
    alpha_mask: bool | None = None  # masked loss from the images' alpha channel (kohya's per-subset alpha_mask)
    recursive: bool = False  # kohya reads a subset's own folder only
    where: str = ""  # "file: [[datasets]] #1 [[datasets.subsets]] #2", for messages


@dataclass
class DatasetSpec:
    subsets: list[SubsetSpec] = field(default_factory=list)
    resolution: int | None = None
    batch_size: int | None = None
    enable_bucket: bool | None = None
    bucket_no_upscale: bool | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    where: str = ""


@dataclass
class DatasetConfig:
    path: Path
    datasets: list[DatasetSpec]
    ignored: list[str] = field(default_factory=list)  # unsupported kohya keys present at their default value


def _check_keys(table: dict, allowed: set[str], where: str, file: str, ignored: list[str]) -> None:
    for key, value in table.items():
        if key in ("datasets", "subsets"):
            continue
        if key not in allowed:
            raise DatasetConfigError(f"{file}: {where} has the key '{key}', which kohya's dataset config does not know "
                                     f"(keys here: {', '.join(sorted(allowed))}). Fix or remove it.")
        default = {**UNSUPPORTED_SUBSET_KEYS, **UNSUPPORTED_DATASET_KEYS}
        if key in default:
            if value != default[key] and not (default[key] is None and value in ("", [], {})):
                raise DatasetConfigError(f"{file}: {where} sets '{key}' = {value!r}, a kohya option sdlora does not "
                                         f"support; remove it (sdlora's unsupported dataset keys: {', '.join(sorted(default))}).")
            ignored.append(key)
            continue
        kind = _TYPES.get(key)
        if key == "resolution":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value))
            if not ok:
                raise DatasetConfigError(f"{file}: {where} key 'resolution' must be a number or [width, height], not {value!r}.")
        elif kind and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            name = {int: "a whole number", str: "text", bool: "true or false"}.get(kind, "a number")
            raise DatasetConfigError(f"{file}: {where} key '{key}' must be {name}, not {value!r}.")


def _resolution(value, file: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        w, h = value
        if w != h:
            raise DatasetConfigError(f"{file}: {where} key 'resolution' = [{w}, {h}]: sdlora trains at a square resolution "
                                     f"(area for buckets); give one number, e.g. resolution = {max(w, h)}.")
        value = w
    if value < 64 or value % 8:
        raise DatasetConfigError(f"{file}: {where} key 'resolution' = {value}: use a multiple of 8, at least 64.")
    return value


def _image_dir(raw: str, toml_path: Path, file: str, where: str) -> Path:
    # kohya reads paths relative to the working folder; a preset moved elsewhere still works relative to its own folder.
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists():
        path = toml_path.parent / path
    if not path.is_dir():
        raise DatasetConfigError(f"{file}: {where} key 'image_dir' = '{shown(raw)}' is not a folder"
                                 f"{' (tried the working folder and the TOML file folder)' if not Path(raw).is_absolute() else ''}. "
                                 "Fix the path.")
    return path


def load_dataset_config(path) -> DatasetConfig:
    """Read and check a kohya dataset TOML (no image is opened here)."""
    toml_path = Path(path).expanduser()
    file = f"Dataset config '{shown(toml_path)}'"
    try:
        data = tomllib.loads(read_user_bytes(toml_path).decode("utf-8"))
    except UserFileError as exc:
        if exc.kind == "too_large":
            raise DatasetConfigError(f"{file} is larger than 1 MiB: far too large for a dataset config.") from None
        raise DatasetConfigError(f"{file} not found (or not a file). Check dataset_config / --dataset-config.") from None
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetConfigError(f"{file} not found (or not a file). Check dataset_config / --dataset-config.") from None
    except UnicodeDecodeError:
        raise DatasetConfigError(f"{file} is not UTF-8 text; save it as UTF-8 TOML.") from None
    except tomllib.TOMLDecodeError as exc:
        raise DatasetConfigError(f"{file} is not valid TOML: {exc}.") from None
    except OSError as exc:
        raise DatasetConfigError(f"{file} cannot be read ({exc.strerror or exc}).") from None
    ignored: list[str] = []
    for key in data:
        if key not in ("general", "datasets"):
            raise DatasetConfigError(f"{file}: top-level key '{key}' is not part of kohya's dataset config "
                                     "(use [general] and [[datasets]] with [[datasets.subsets]]).")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise DatasetConfigError(f"{file}: 'general' must be a table ([general]).")
    _check_keys(general, _DATASET_ALLOWED, "[general]", file, ignored)
    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise DatasetConfigError(f"{file}: no [[datasets]] table; add one with at least one [[datasets.subsets]] image_dir.")
    datasets = []
    for d_i, raw_ds in enumerate(raw_datasets, 1):
        d_where = f"[[datasets]] #{d_i}"
        if not isinstance(raw_ds, dict):
            raise DatasetConfigError(f"{file}: {d_where} must be a table.")
        _check_keys(raw_ds, _DATASET_ALLOWED, d_where, file, ignored)
        merged = {**general, **raw_ds}
        ds = DatasetSpec(resolution=_resolution(merged.get("resolution"), file, d_where), where=f"{file}: {d_where}",
                         **{k: merged.get(k) for k in DATASET_KEYS if k != "resolution"})
        for key in ("batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            value = getattr(ds, key)
            if value is not None and not 1 <= value <= 4096 * (4 if key != "batch_size" else 1):
                raise DatasetConfigError(f"{file}: {d_where} key '{key}' = {value} is out of range.")
        raw_subsets = raw_ds.get("subsets")
        if not isinstance(raw_subsets, list) or not raw_subsets:
            raise DatasetConfigError(f"{file}: {d_where} has no [[datasets.subsets]]; add one with image_dir = \"...\".")
        for s_i, raw_sub in enumerate(raw_subsets, 1):
            s_where = f"{d_where} [[datasets.subsets]] #{s_i}"
            if not isinstance(raw_sub, dict):
                raise DatasetConfigError(f"{file}: {s_where} must be a table.")
            _check_keys(raw_sub, _SUBSET_ALLOWED, s_where, file, ignored)
            if "image_dir" not in raw_sub:
                raise DatasetConfigError(f"{file}: {s_where} has no 'image_dir'; every subset names its image folder.")
            opts = {**{k: v for k, v in general.items() if k in SUBSET_KEYS},
                    **{k: v for k, v in raw_ds.items() if k in SUBSET_KEYS}, **raw_sub}
            repeats = opts.get("num_repeats", 1)
            if not 1 <= repeats <= 10_000:
                raise DatasetConfigError(f"{file}: {s_where} key 'num_repeats' = {repeats}: use 1 to 10000.")
            if opts.get("keep_tokens") is not None and opts["keep_tokens"] < 0:
                raise DatasetConfigError(f"{file}: {s_where} key 'keep_tokens' must be 0 or more.")
            rate, tag_rate = opts.get("caption_dropout_rate"), opts.get("caption_tag_dropout_rate")
            for key, value in (("caption_dropout_rate", rate), ("caption_tag_dropout_rate", tag_rate)):
                if value is not None and not 0 <= value < 1:
                    raise DatasetConfigError(f"{file}: {s_where} key '{key}' must be at least 0 and below 1.")
            ext = opts.get("caption_extension")
            if ext is not None and not ext.strip(". "):
                raise DatasetConfigError(f"{file}: {s_where} key 'caption_extension' is empty; e.g. \".txt\".")
            ds.subsets.append(SubsetSpec(
                image_dir=_image_dir(opts["image_dir"], toml_path, file, s_where), is_reg=bool(opts.get("is_reg", False)),
                num_repeats=repeats, caption_extension=("." + ext.lstrip(".")) if ext else None,
                class_tokens=opts.get("class_tokens") or "", keep_tokens=opts.get("keep_tokens"),
                shuffle_caption=opts.get("shuffle_caption"), flip_aug=opts.get("flip_aug"),
                caption_dropout_rate=None if rate is None else float(rate),
                caption_tag_dropout_rate=None if tag_rate is None else float(tag_rate), caption_prefix=opts.get("caption_prefix") or "",
                caption_suffix=opts.get("caption_suffix") or "", random_crop=opts.get("random_crop"),
                alpha_mask=opts.get("alpha_mask"), where=f"{file}: {s_where} (image_dir '{shown(opts['image_dir'])}')"))
        datasets.append(ds)
    if not any(not s.is_reg for d in datasets for s in d.subsets):
        raise DatasetConfigError(f"{file}: every subset has is_reg = true: regularization images need training images "
                                 "too; add a subset without is_reg.")
    return DatasetConfig(path=toml_path, datasets=datasets, ignored=sorted(set(ignored)))


def folder_subsets(root: Path, *, is_reg: bool) -> list[SubsetSpec]:
    """kohya's folder mode for reg_data_dir: each `N_class` subfolder is a subset with N repeats and class tokens
    'class' (the caption of images without a caption file)."""
    from .scan import _REPEATS_FOLDER, MAX_REPEATS

    root = Path(root).expanduser()
    if not root.is_dir():
        what = "reg_data_dir" if is_reg else "data_dir"
        raise DatasetError(f"{what}: '{shown(root)}' is not a folder. Give a folder of kohya N_class subfolders.")
    subsets = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        m = _REPEATS_FOLDER.match(entry.name)
        if not m or not 1 <= int(m.group(1)) <= MAX_REPEATS:
            continue
        subsets.append(SubsetSpec(image_dir=Path(entry.path), is_reg=is_reg, num_repeats=int(m.group(1)),
                                  class_tokens=m.group(2).strip(), recursive=True,
                                  where=f"reg_data_dir '{shown(root)}' folder '{shown(entry.name)}'"))
    if not subsets:
        raise DatasetError(f"reg_data_dir: '{shown(root)}' holds no kohya N_class folders (e.g. 1_person with class "
                           "images inside). Create one, or clear reg_data_dir.")
    return subsets
