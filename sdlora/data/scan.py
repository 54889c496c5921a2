"""Scan a dataset folder: which images are usable, their captions and repeats, and why others were skipped."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .captions import split_tags
from .images import MAX_PIXELS, ImageLoadError, open_image_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_REPEATS = re.compile(r"^(\d+)_(.+)$")
_MAX_TOKENS = 75


class DatasetError(ValueError):
    pass


@dataclass
class ImageItem:
    path: Path
    caption: str
    caption_source: str
    caption_path: Path | None
    repeats: int
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class DatasetReport:
    root: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def num_captioned(self) -> int:
        return sum(1 for i in self.items if i.caption_source != "default")

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def total_samples(self) -> int:
        return sum(i.repeats for i in self.items)

    def summary(self) -> str:
        lines = [f"Found {self.num_images} images in {self.root}: {self.num_captioned} captioned, "
                 f"{self.num_images - self.num_captioned} default caption, {self.num_skipped} skipped"]
        lines += [f"  skipped {self._rel(s.path)}: {s.reason}" for s in self.skipped]
        for item in self.items:
            lines += [f"  note {self._rel(item.path)}: {w}" for w in item.warnings]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _rel(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def to_dict(self) -> dict:
        return {
            "root": str(self.root), "num_images": self.num_images, "num_captioned": self.num_captioned,
            "num_skipped": self.num_skipped, "total_samples": self.total_samples,
            "items": [{"path": str(i.path), "caption": i.caption, "caption_source": i.caption_source,
                       "caption_path": str(i.caption_path) if i.caption_path else None, "repeats": i.repeats,
                       "width": i.width, "height": i.height, "warnings": i.warnings} for i in self.items],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "warnings": self.warnings, "tag_frequency": self.tag_frequency,
        }


def _read_caption_file(path: Path) -> tuple[str | None, list[str]]:
    """(caption or None if unusable, warnings)."""
    notes = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [f"caption file {path.name} unreadable ({exc.strerror or exc}); using the default caption"]
    if b"\x00" in raw:
        return None, [f"caption file {path.name} is binary; using the default caption"]
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        notes.append(f"caption file {path.name} is not UTF-8; undecodable bytes were replaced")
    return " ".join(text.split()), notes


def _approx_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def _load_metadata(folder: Path, warns: list[str]) -> dict[Path, str]:
    meta = folder / "metadata.jsonl"
    out: dict[Path, str] = {}
    if not meta.is_file():
        return out
    try:
        lines = meta.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        warns.append(f"{meta}: unreadable ({exc.strerror or exc})")
        return out
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[(folder / row["file_name"]).resolve()] = " ".join(str(row.get("text", "")).split())
        except (ValueError, KeyError, TypeError):
            warns.append(f"{meta.name} line {n}: not a JSON object with file_name and text; ignored")
    return out


def _repeats_for(path: Path, root: Path) -> tuple[int, str]:
    rel_parts = path.relative_to(root).parts[:-1]
    for part in reversed(rel_parts):
        m = _REPEATS.match(part)
        if m:
            return max(1, int(m.group(1))), part
    m = _REPEATS.match(root.name)
    if m:
        return max(1, int(m.group(1))), root.name
    return 1, (rel_parts[-1] if rel_parts else root.name)


def _check_image(path: Path, full: bool) -> tuple[int, int, list[str]]:
    """Size after EXIF transpose and notes; raises ImageLoadError with the reason."""
    notes = []
    if path.stat().st_size == 0:
        raise ImageLoadError("zero-byte file")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                frames = getattr(img, "n_frames", 1)
                mode = img.mode
                orientation = img.getexif().get(0x0112, 1)
    except Image.DecompressionBombError:
        raise ImageLoadError(f"image is larger than {MAX_PIXELS // 1_000_000} megapixels; downscale it first") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image (Pillow cannot identify the file format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"truncated or corrupt image: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is used")
    if mode == "CMYK":
        notes.append("CMYK image: converted to RGB")
    if full:
        try:
            open_image_rgb(path, max_side=1024)
        except ImageLoadError as exc:
            raise ImageLoadError(str(exc).split(": ", 1)[-1]) from None
    return w, h, notes


def scan_dataset(root, *, default_caption: str = "", caption_extensions=(".txt", ".caption"), min_size: int = 0,
                 upscale_small: bool = True, check_images: bool = True) -> DatasetReport:
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"Dataset folder '{root}' does not exist. Point --data at a folder of images with .txt captions.")
    if not root.is_dir():
        raise DatasetError(f"Dataset path '{root}' is a file, not a folder. Point --data at the folder that holds the images.")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"Dataset folder '{root}' is not readable (permission denied). Fix its permissions or copy the images elsewhere.")
    root = root.resolve()
    report = DatasetReport(root=root)
    tags: dict[str, Counter] = {}
    metadata_cache: dict[Path, dict[Path, str]] = {}
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: str(p.relative_to(root)))
    for path in files:
        if path.is_symlink():
            target = path.resolve()
            try:
                target.relative_to(root)
            except ValueError:
                report.skipped.append(SkippedFile(path, f"symlink points outside the dataset folder (to {target})"))
                continue
        if not os.access(path, os.R_OK):
            report.skipped.append(SkippedFile(path, "unreadable (permission denied)"))
            continue
        try:
            w, h, notes = _check_image(path, check_images)
        except ImageLoadError as exc:
            reason = str(exc)
            if not reason.startswith(("not an image", "zero-byte", "image is larger", "truncated or corrupt")):
                reason = f"truncated or corrupt image: {reason}"
            report.skipped.append(SkippedFile(path, reason))
            continue
        except OSError as exc:
            report.skipped.append(SkippedFile(path, f"unreadable ({exc.strerror or exc})"))
            continue
        if min_size and min(w, h) < min_size:
            if not upscale_small:
                report.skipped.append(SkippedFile(path, f"image {w}x{h} is smaller than the minimum {min_size} px and upscaling is off"))
                continue
            notes.append(f"image {w}x{h} is smaller than {min_size} px: it will be upscaled")
        caption, source, caption_path = None, "default", path.with_suffix(".txt")
        for ext in caption_extensions:
            candidate = path.with_suffix(ext)
            if candidate.is_file():
                text, cnotes = _read_caption_file(candidate)
                notes += cnotes
                caption_path = candidate
                if text:
                    caption, source = text, ext.lstrip(".")
                elif text is not None:
                    notes.append(f"caption file {candidate.name} is empty; using the default caption")
                break
        if caption is None and caption_path == path.with_suffix(".txt") and not caption_path.exists():
            for folder in (path.parent, root):
                if folder not in metadata_cache:
                    metadata_cache[folder] = _load_metadata(folder, report.warnings)
                text = metadata_cache[folder].get(path.resolve())
                if text:
                    caption, source = text, "metadata"
                    break
        if caption is None:
            caption = ""
        if caption and _approx_tokens(caption) > _MAX_TOKENS:
            notes.append(f"caption is longer than {_MAX_TOKENS} tokens: the text encoder will see it truncated")
        repeats, group = _repeats_for(path, root)
        report.items.append(ImageItem(path=path, caption=caption, caption_source=source, caption_path=caption_path,
                                      repeats=repeats, width=w, height=h, warnings=notes))
        tags.setdefault(group, Counter()).update(split_tags(caption or default_caption))
    report.tag_frequency = {k: dict(v) for k, v in tags.items()}
    if not report.items:
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in report.skipped[:3])
        detail = f" {len(report.skipped)} file(s) were skipped ({reasons})." if report.skipped else ""
        raise DatasetError(f"No usable images in '{root}'.{detail} Accepted formats: {', '.join(IMAGE_EXTENSIONS)}.")
    return report
