"""Files in and out. Writes go through a temp file, fsync and rename, so a crash never leaves a half-written file under
the real name. Reads of user-named files (presets, configs, dataset TOMLs, captions, metadata.jsonl, prompt lists)
go through read_user_bytes and its wrappers here, and only through them: each is bounded in size and never blocks,
because a FIFO, a device or a folder is refused, naming the file, before a byte is read."""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds it is synced and renamed onto `path`,
    when it fails it is removed and `path` is left as it was."""
    from .outputs import check_output_file

    path = check_output_file(Path(path))  # never replace a folder, a device or a pipe
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name must fit the file system's 255-byte limit even when the real name nearly fills it.
    prefix = f".{path.name}." if len(os.fsencode(path.name)) <= 200 else ".sdlora-write."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file: name the one meant
            exc.filename = str(path)
        raise


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


USER_FILE_LIMIT = 1 << 20  # presets, dataset TOMLs, captions, prompt lists: a megabyte is thousands of lines


class UserFileError(UserError, ValueError):
    """A user-named path that is not a regular file, or is larger than allowed. `kind` is "folder", "special" (FIFO,
    device, socket) or "too_large"; `reason` the short why; the message names the file."""

    def __init__(self, path: Path, kind: str, *, size: int = 0, limit: int = 0):
        self.path, self.kind, self.size, self.limit = path, kind, size, limit
        self.reason = f"larger than {limit // 1024} KiB" if kind == "too_large" else "not a regular file"
        super().__init__(f"'{path}' is {self.reason}")


def _check_regular(path: Path, st, max_bytes: int | None) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise UserFileError(path, "folder")
    if not stat.S_ISREG(st.st_mode):
        raise UserFileError(path, "special")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserFileError(path, "too_large", size=st.st_size, limit=max_bytes)


def _read_regular(path, count: int, max_bytes: int | None) -> bytes:
    # stat first so that a device is never even opened; the non-blocking open and fstat catch a path swapped between
    path = Path(path)
    _check_regular(path, os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        _check_regular(path, os.fstat(fh.fileno()), max_bytes)
        return fh.read(count)


def read_user_bytes(path, max_bytes: int = USER_FILE_LIMIT) -> bytes:
    """The bytes of a user-named regular file of at most max_bytes. Raises UserFileError for a folder, FIFO, device,
    socket or a larger file (also one that grew while read), OSError as usual (missing, no permission)."""
    data = _read_regular(path, max_bytes + 1, max_bytes)
    if len(data) > max_bytes:
        raise UserFileError(Path(path), "too_large", size=len(data), limit=max_bytes)
    return data


def read_user_head(path, count: int) -> bytes:
    """The first `count` bytes of a user-named regular file of any size (refusals as read_user_bytes)."""
    return _read_regular(path, count, None)


def read_text_limited(path, max_bytes: int = USER_FILE_LIMIT) -> str:
    """The UTF-8 text of a small user-named file (undecodable bytes replaced); refusals as read_user_bytes."""
    return read_user_bytes(path, max_bytes).decode("utf-8", errors="replace")
