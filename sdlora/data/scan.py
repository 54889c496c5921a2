"""Scan a dataset folder: which images are usable, their captions and repeats, and why others were skipped.

Nothing here raises for a bad file: every image file becomes either an ImageItem (perhaps with warnings) or
a SkippedFile with a one-line reason. Only an unusable folder raises DatasetError, before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..fileio import USER_FILE_LIMIT, UserFileError, read_user_bytes
from ..safetext import clean_text, shown
from .captions import split_tags
from .images import IMAGE_EXTENSIONS, ImageLoadError, exif_orientation, open_image

# kohya's "N_name" folder convention. Above MAX_REPEATS the number is more likely a date ("20240101_trip").
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 1000
CLIP_TOKEN_LIMIT = 75
# Above this many pixels only JPEGs (decoded at 1/8 scale) are test-decoded; other formats are checked by their
# headers and chunk CRCs, because decoding them would take GBs of memory during a mere scan.
_DECODE_CHECK_PIXELS = 50_000_000
_CHECK_DRAFT_SIZE = (256, 256)
METADATA_LIMIT = 64 * USER_FILE_LIMIT  # metadata.jsonl: one line per image, room for hundreds of thousands


class DatasetError(UserError, ValueError):
    """A dataset folder that cannot be trained on. The message names the folder and says what to do."""


@dataclass
class ImageItem:
    path: Path
    caption: str  # raw caption text as found (no trigger word); "" when the default caption applies
    caption_source: str  # "txt" | "caption" (the caption file's extension) | "metadata" | "default"
    caption_path: Path | None  # the caption file it came from, or where a new .txt would go
    repeats: int
    width: int  # after EXIF orientation
    height: int
    warnings: list[str] = field(default_factory=list)
    subset: str = ""  # the kohya N_name folder it belongs to (the key of its tag frequency)


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
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya's ss_tag_frequency

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
        lines = [(f"Found {self.num_images} images in {self.root}: {self.num_captioned} captioned, "
                  f"{self.num_images - self.num_captioned} default caption, {self.num_skipped} skipped")]
        lines += [f"  skipped {self._rel(s.path)}: {s.reason}" for s in self.skipped]
        lines += [f"  note {self._rel(i.path)}: {w}" for i in self.items for w in i.warnings]
        lines += [f"  warning: {w}" for w in self.warnings]
        return shown("\n".join(lines))  # file names that are not UTF-8 appear escaped: the text goes to terminals and web pages

    def _rel(self, path: Path) -> str:
        path = Path(path)
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def to_dict(self) -> dict:
        def plain(obj):
            return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(obj).items()}

        return {"root": str(self.root), "num_images": self.num_images, "num_captioned": self.num_captioned,
                "num_skipped": self.num_skipped, "total_samples": self.total_samples,
                "items": [plain(i) for i in self.items], "skipped": [plain(s) for s in self.skipped],
                "warnings": list(self.warnings), "tag_frequency": self.tag_frequency}


class _Skip(Exception):
    pass


# captions ------------------------------------------------------------------------------------------------

def _read_caption_file(path: Path) -> tuple[str | None, list[str]]:
    """(caption with whitespace collapsed, or None when the file is unusable; notes)."""
    try:
        raw = read_user_bytes(path)
    except UserFileError as exc:
        return None, [f"caption file {path.name} is unreadable ({exc.reason}); the default caption is used"]
    except OSError as exc:
        return None, [f"caption file {path.name} is unreadable ({exc.strerror or exc}); the default caption is used"]
    if b"\x00" in raw:
        return None, [f"caption file {path.name} is binary, not text; the default caption is used"]
    try:
        text = raw.decode("utf-8-sig")
        notes = []
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        notes = [f"caption file {path.name} is not UTF-8; undecodable bytes were replaced with \ufffd (re-save it as UTF-8)"]
    return " ".join(text.split()), notes


def _approx_clip_tokens(text: str) -> int:
    # No tokenizer is loaded during a scan: CLIP's BPE makes at least one token per word and per punctuation mark.
    return len(re.findall(r"\w+|[^\w\s]", text))


def _load_metadata(folder: Path, root: Path, warns: list[str]) -> dict[str, str]:
    """metadata.jsonl (Hugging Face imagefolder style) in `folder`: {normalised absolute image path: text}."""
    meta = folder / "metadata.jsonl"
    out: dict[str, str] = {}
    if not meta.is_file():
        return out
    name = meta.relative_to(root).as_posix()
    try:
        raw = read_user_bytes(meta, METADATA_LIMIT)
    except UserFileError as exc:
        warns.append(f"{name} is unreadable ({exc.reason}); its captions were not used")
        return out
    except OSError as exc:
        warns.append(f"{name} is unreadable ({exc.strerror or exc}); its captions were not used")
        return out
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        lines = raw.decode("utf-8-sig", errors="replace").splitlines()
        warns.append(f"{name} is not UTF-8; undecodable bytes were replaced")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            row = None
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(text, (str, type(None))):
            warns.append(f'{name} line {n} is not a JSON object with "file_name" and "text"; the line was ignored')
            continue
        try:
            key = os.path.normpath(folder / row["file_name"])
        except (ValueError, TypeError):  # e.g. a NUL character in the name
            warns.append(f"{name} line {n} has an unusable file_name; the line was ignored")
            continue
        # Lone surrogates ("\ud800") can come from JSON escapes: no tokenizer or metadata writer can take them.
        out[key] = clean_text(" ".join((text or "").split()))
    return out


def _find_caption(path: Path, root: Path, caption_extensions, metadata_text) -> tuple[str, str, Path, list[str]]:
    """(caption, source, caption_path, notes) by priority: caption files in order, then metadata.jsonl."""
    notes = []
    for ext in caption_extensions:
        candidate = path.with_suffix(ext)
        if candidate.is_symlink() and not candidate.resolve().is_relative_to(root):
            # same rule as for images; it also keeps files outside the dataset from showing up as captions in the UI
            notes.append(f"caption file {candidate.name} links outside the dataset folder; it was ignored")
            continue
        if candidate.is_file():
            text, file_notes = _read_caption_file(candidate)
            notes += file_notes
            if text:
                return text, ext.lstrip("."), candidate, notes
            if text is not None:
                notes.append(f"caption file {candidate.name} is empty; the default caption is used")
            return "", "default", candidate, notes
    text = metadata_text(path)
    if text:
        return text, "metadata", path.with_suffix(".txt"), notes
    if text == "":
        notes.append("its metadata.jsonl text is empty; the default caption is used")
    return "", "default", path.with_suffix(".txt"), notes


# images --------------------------------------------------------------------------------------------------

def _check_file(path: Path, root: Path) -> None:
    if path.is_symlink():
        try:
            target = path.resolve(strict=False)
        except (OSError, RuntimeError):
            raise _Skip("symlink loop") from None
        if not target.is_relative_to(root):
            raise _Skip(f"symlink points outside the dataset folder (to {target})")
        if not target.exists():
            raise _Skip(f"broken symlink (its target {target} does not exist)")
    try:
        st = path.stat()
    except OSError as exc:
        raise _Skip(f"unreadable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Skip("not a regular file")
    if st.st_size == 0:
        raise _Skip("zero-byte file")


def _inspect_image(path: Path, full_check: bool) -> tuple[int, int, list[str]]:
    """(width, height) after EXIF orientation and notes; raises ImageLoadError. Never decodes a big image fully."""
    notes = []
    with open_image(path) as img:
        w, h = img.size
        mode, fmt = img.mode, img.format
        frames = getattr(img, "n_frames", 1)
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La")
        transparent = has_alpha or "transparency" in img.info
        orientation = exif_orientation(img, headers_only=True)
    if full_check:
        # verify(): PNG checks every chunk's CRC up to IEND, which finds truncation without decoding.
        with open_image(path) as img:
            img.verify()
        if fmt == "JPEG" or w * h <= _DECODE_CHECK_PIXELS:
            with open_image(path) as img:
                img.draft(img.mode, _CHECK_DRAFT_SIZE)  # JPEG: decode at 1/8 scale; truncation is still found
                img.load()
                orientation = exif_orientation(img)  # decoded anyway: now late PNG eXIf chunks are seen too
                if has_alpha:  # many RGBA files are fully opaque: only mention transparency that is there
                    transparent = img.getchannel("A").getextrema()[0] < 255
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is used")
    if mode == "CMYK":
        notes.append("CMYK image: converted to RGB")
    if mode.startswith("I;16"):
        notes.append("16-bit image: scaled to 8 bits per channel")
    if transparent:
        notes.append("has transparency: transparent pixels become white")
    if w * h > _DECODE_CHECK_PIXELS:
        notes.append(f"large image ({w}x{h}): it is reduced on every load; downscaling it first makes training faster")
    return w, h, notes


def _examine(path: Path, root: Path, full_check: bool) -> tuple[int, int, list[str]]:
    _check_file(path, root)
    try:
        return _inspect_image(path, full_check)
    except ImageLoadError as exc:
        raise _Skip(exc.reason) from None
    except MemoryError:
        raise _Skip("not enough memory to decode it; downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _Skip(f"truncated or corrupt image: {exc}") from None


# folders -------------------------------------------------------------------------------------------------

def _image_files(root: Path, warns: list[str], recursive: bool = True) -> list[Path]:
    def unreadable(exc: OSError):
        warns.append(f"folder '{exc.filename}' is unreadable ({exc.strerror or exc}); images in it were skipped")

    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        folder = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for d in dirnames:
            if (folder / d).is_symlink():  # os.walk does not follow them: say so instead of silently ignoring
                warns.append(f"folder link '{(folder / d).relative_to(root).as_posix()}' was not followed; "
                             "copy those images into the dataset folder instead")
        files += [folder / n for n in filenames if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        if not recursive:
            break
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _repeats_and_subset(path: Path, root: Path, warned: set[str], warns: list[str]) -> tuple[int, str]:
    """Repeats from the nearest "N_name" folder (subfolders first, then the root's own name), and the subset name
    used as the key of the tag frequency."""
    for name in [*reversed(path.relative_to(root).parts[:-1]), root.name]:
        m = _REPEATS_FOLDER.match(name)
        if not m:
            continue
        n = int(m.group(1))
        if 1 <= n <= MAX_REPEATS:
            return n, name
        if name not in warned:
            warned.add(name)
            warns.append(f"folder '{name}' looks like kohya's N_name but {n} repeats is outside 1..{MAX_REPEATS}; "
                         f"it counts as 1 repeat (rename it, e.g. '10_{m.group(2)}', to set repeats)")
    return 1, root.name


def check_dataset_root(root: Path) -> Path:
    if not root.exists():
        raise DatasetError(f"Dataset folder '{root}' does not exist. Point --data at a folder of images with .txt captions.")
    if not root.is_dir():
        raise DatasetError(f"Dataset path '{root}' is a file, not a folder. Point --data at the folder that holds the images.")
    try:
        with os.scandir(root):
            pass
    except OSError as exc:
        raise DatasetError(f"Dataset folder '{root}' is unreadable ({exc.strerror or exc}). Fix its permissions or copy "
                           "the images to a folder you can read.") from None
    return root.resolve()


def scan_dataset(root, *, default_caption: str = "", caption_extensions=(".txt", ".caption"), min_size: int = 0,
                 upscale_small: bool = True, check_images: bool = True, recursive: bool = True) -> DatasetReport:
    """Find every image under `root` (recursively) with its caption and repeats; report what was skipped and why.

    check_images=False reads headers only (fast, for galleries); True also test-decodes each image so truncated
    files are caught here rather than mid-training. Raises DatasetError for a missing/unreadable folder or one
    without a single usable image.
    """
    root = check_dataset_root(Path(root).expanduser())
    caption_extensions = tuple(e if e.startswith(".") else f".{e}" for e in caption_extensions)
    report = DatasetReport(root=root)
    metadata: dict[Path, dict[str, str]] = {}
    tags: dict[str, Counter] = {}
    caption_users: dict[Path, list[Path]] = {}
    warned_folders: set[str] = set()

    def metadata_text(path: Path) -> str | None:
        key = os.path.normpath(path)
        for folder in dict.fromkeys((path.parent, root)):  # the image's own folder first, then the root
            if folder not in metadata:
                metadata[folder] = _load_metadata(folder, root, report.warnings)
            if key in metadata[folder]:
                return metadata[folder][key]
        return None

    for path in _image_files(root, report.warnings, recursive):
        try:
            w, h, notes = _examine(path, root, check_images)
        except _Skip as skip:
            report.skipped.append(SkippedFile(path, str(skip)))
            continue
        if min_size and min(w, h) < min_size:
            if not upscale_small:
                report.skipped.append(SkippedFile(path, f"image {w}x{h} is smaller than the minimum {min_size} px and upscaling is off"))
                continue
            notes.append(f"image {w}x{h} is smaller than {min_size} px: it will be upscaled")
        caption, source, caption_path, caption_notes = _find_caption(path, root, caption_extensions, metadata_text)
        notes += caption_notes
        if (n := _approx_clip_tokens(caption)) > CLIP_TOKEN_LIMIT:
            notes.append(f"caption has about {n} tokens: text longer than {CLIP_TOKEN_LIMIT} tokens will be truncated "
                         "by the text encoder")
        repeats, subset = _repeats_and_subset(path, root, warned_folders, report.warnings)
        report.items.append(ImageItem(path=path, caption=caption, caption_source=source, caption_path=caption_path,
                                      repeats=repeats, width=w, height=h, warnings=notes, subset=subset))
        tags.setdefault(subset, Counter()).update(split_tags(caption or default_caption))
        if caption_path.is_file():
            caption_users.setdefault(caption_path, []).append(path)

    for caption_path, users in caption_users.items():
        if len(users) > 1:  # e.g. a.png and a.jpg: both read (and an edit rewrites) a.txt
            names = ", ".join(u.name for u in users)
            report.warnings.append(f"{names} share the caption file {caption_path.name}; give each image its own caption file")
    report.tag_frequency = {k: dict(v) for k, v in tags.items()}
    if not report.items:
        raise DatasetError(_no_usable_images_message(report))
    return report


def _no_usable_images_message(report: DatasetReport) -> str:
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not report.skipped:
        return (f"No usable images in '{report.root}': it holds no image files. Accepted types: {accepted}. "
                "Point --data at a folder of images (captions go in same-name .txt files).")
    listed = "; ".join(f"{report._rel(s.path)}: {s.reason}" for s in report.skipped[:3])
    more = f"; and {report.num_skipped - 3} more" if report.num_skipped > 3 else ""
    return shown(f"No usable images in '{report.root}': all {report.num_skipped} image file(s) were skipped ({listed}{more}). "
                 f"Accepted types: {accepted}. Fix or replace those files, or point --data at another folder.")
