"""Uploaded images and zips become a dataset folder under OUTPUT/uploads, safely.

A zip is refused whole if any entry would land outside the upload folder (absolute paths, '..', drive letters)
or if it unpacks to more than the size limit; sizes are counted while copying, so a zip whose headers lie about
sizes is stopped too. Only images and caption files are extracted; links and everything else are ignored.
"""

from __future__ import annotations

import errno
import shutil
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath

from ..config.train_config import ConfigError
from ..data.scan import IMAGE_EXTENSIONS
from ..safetext import shown

MAX_UPLOAD_BYTES = 2 * 1024 ** 3  # uncompressed total of one upload
MAX_FILES = 20_000
CAPTION_EXTENSIONS = (".txt", ".caption", ".jsonl")
_CHUNK = 1 << 20


def _mib(n: int) -> str:
    return f"{n / 1024 ** 2:.0f} MiB"


def safe_member(name: str) -> PurePosixPath | None:
    """The entry's relative path, or None if it would land outside the target folder (zip-slip)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name or p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


def _copy_limited(src, dest: Path, budget: int, what: str, limit: int) -> int:
    """Copy a stream, counting bytes; refuse once the upload's total would pass the limit."""
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > budget:
                raise ConfigError(f"{what} unpacks to more than the upload limit of {_mib(limit)}. Upload fewer or smaller files.")
            out.write(chunk)
    return written


def extract_zip(zip_path: Path, dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES, limit: int | None = None) -> int:
    """Extract images/captions only into dest; returns bytes written. Refuses the whole archive if any entry escapes
    or the content is larger than max_bytes (the part of the upload limit still left)."""
    limit = limit or max_bytes
    name = Path(zip_path).name
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise ConfigError(f"'{name}' is not a valid zip file.") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_FILES:
            raise ConfigError(f"'{name}' holds {len(members)} files; the limit is {MAX_FILES}.")
        for m in members:
            if safe_member(m.filename) is None:
                raise ConfigError(f"'{name}' contains the entry '{m.filename}', which points outside the upload folder. "
                                  "Refusing the archive.")
        declared = sum(m.file_size for m in members)
        if declared > max_bytes:
            raise ConfigError(f"'{name}' unpacks to {_mib(declared)}; the upload limit is {_mib(limit)}.")
        total = 0
        for m in members:
            rel = safe_member(m.filename)
            is_link = stat.S_ISLNK(m.external_attr >> 16)
            if m.is_dir() or is_link or rel.suffix.lower() not in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                continue
            if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
                continue  # macOS resource forks and hidden files are not dataset content
            target = dest.joinpath(*rel.parts)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src:
                    total += _copy_limited(src, target, max_bytes - total, f"'{name}'", limit)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
                raise ConfigError(f"'{name}': cannot extract '{m.filename}' ({exc}).") from None
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                raise ConfigError(f"'{name}' contains the entry '{shown(m.filename)}', whose name is longer than the file "
                                  "system allows. Rename it (or the folders it is in) and upload again.") from None
    return total


def import_uploads(files: list[str], uploads_root: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Copy uploaded images/captions (and unpack zips) into a new folder under uploads_root; returns it.
    On any refusal the new folder is removed again."""
    files = [f for f in (files or []) if f]
    if not files:
        raise ConfigError("No files uploaded. Drop images (with .txt captions) or a .zip of them.")
    uploads_root = Path(uploads_root)
    dest = uploads_root / time.strftime("upload-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = uploads_root / f"{time.strftime('upload-%Y%m%d-%H%M%S')}-{n}"
        n += 1
    dest.mkdir(parents=True)
    total = 0
    try:
        for f in files:
            path = Path(f)
            suffix = path.suffix.lower()
            if suffix == ".zip":
                total += extract_zip(path, dest, max_bytes=max_bytes - total, limit=max_bytes)
            elif suffix in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                with open(path, "rb") as src:
                    total += _copy_limited(src, dest / path.name, max_bytes - total, "This upload", max_bytes)
            else:
                raise ConfigError(f"'{path.name}' is neither an image, a caption file nor a .zip; upload only those.")
        if not any(p.is_file() for p in dest.rglob("*")):
            raise ConfigError("The upload holds no images or caption files.")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
