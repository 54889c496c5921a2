"""Uploaded images and zips become a dataset folder under OUTPUT/uploads, safely."""

from __future__ import annotations

import shutil
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath

from ..config import ConfigError
from ..data.scan import IMAGE_EXTENSIONS

MAX_UPLOAD_BYTES = 2 * 1024 ** 3  # uncompressed total of one upload
MAX_FILES = 20_000
CAPTION_EXTENSIONS = (".txt", ".caption", ".jsonl")


def _safe_member(name: str) -> PurePosixPath | None:
    """The member's relative path, or None if it would land outside the target (zip-slip)."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


def extract_zip(zip_path: Path, dest: Path, *, max_bytes: int = MAX_UPLOAD_BYTES) -> int:
    """Extract images/captions only; refuse the whole archive if any entry escapes or it is too large."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise ConfigError(f"'{Path(zip_path).name}' is not a valid zip file.") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_FILES:
            raise ConfigError(f"'{Path(zip_path).name}' holds {len(members)} files; the limit is {MAX_FILES}.")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise ConfigError(f"'{Path(zip_path).name}' unpacks to {total / 1024 ** 2:.0f} MiB; the limit is {max_bytes / 1024 ** 2:.0f} MiB.")
        for m in members:
            if _safe_member(m.filename) is None:
                raise ConfigError(f"'{Path(zip_path).name}' contains the entry '{m.filename}', which points outside the "
                                  "upload folder. Refusing the archive.")
        count = 0
        for m in members:
            rel = _safe_member(m.filename)
            is_link = stat.S_ISLNK(m.external_attr >> 16)
            if m.is_dir() or is_link or rel.suffix.lower() not in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count += 1
    return count


def import_uploads(files: list[str], uploads_root: Path) -> Path:
    """Copy uploaded images/captions (and unpack zips) into a new folder; returns it."""
    if not files:
        raise ConfigError("No files uploaded. Drop images (with .txt captions) or a .zip of them.")
    dest = Path(uploads_root) / time.strftime("upload-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
        n += 1
    dest.mkdir(parents=True)
    total = 0
    try:
        for f in files:
            path = Path(f)
            if path.suffix.lower() == ".zip":
                extract_zip(path, dest)
            elif path.suffix.lower() in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                total += path.stat().st_size
                if total > MAX_UPLOAD_BYTES:
                    raise ConfigError("Upload too large: the limit is 2 GiB per upload.")
                shutil.copyfile(path, dest / Path(path.name).name)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
