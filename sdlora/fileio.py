"""Write files so a crash never leaves a half-written file under the real name: temp file, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


SMALL_TEXT_LIMIT = 1 << 20  # prompt files and the like: a megabyte is thousands of lines


def read_text_limited(path, max_bytes: int = SMALL_TEXT_LIMIT) -> str:
    """The UTF-8 text of a small regular file, read so that it can never block or exhaust memory: FIFOs, devices,
    sockets and folders are refused before they are opened (and again after, in case the path changed), the open is
    non-blocking, and a file larger than max_bytes is refused. Raises ValueError with a sentence, OSError as usual."""
    import stat

    path = Path(path)

    def check(st) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"'{path}' is not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"'{path}' is larger than {max_bytes // 1024} KiB")

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        check(os.fstat(fh.fileno()))
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"'{path}' is larger than {max_bytes // 1024} KiB")
    return data.decode("utf-8", errors="replace")
