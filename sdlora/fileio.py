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
