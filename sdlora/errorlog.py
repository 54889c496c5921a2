"""The outer error boundary: any exception becomes one sentence for the user; the traceback goes to a log file.

The CLI and the background jobs call `describe()`. Errors the library phrases for the user (sdlora.errors) are shown as
they are. Anything else is named by what was being done (the command and its file or setting), what went wrong in one
line, and where the full traceback was written: OUTPUT/logs/ for a training run when that folder is writable, else
$SDLORA_CACHE/logs/, else the system temp folder.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .safetext import shown

LOG_DIR = "logs"
_MAX_DETAIL = 240


def log_dirs(out_dir=None) -> list[Path]:
    from .paths import cache_dir

    dirs = [Path(out_dir) / LOG_DIR] if out_dir else []
    return dirs + [cache_dir() / LOG_DIR, Path(tempfile.gettempdir()) / "sdlora-logs"]


def write_traceback(exc: BaseException, *, context: str = "", out_dir=None) -> Path | None:
    """Write the traceback of `exc` to a new log file; its path, or None when no folder could take it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", context.split(" ")[0] if context else "error").strip("-").lower()[:20] or "error"
    text = (f"sdlora error log, {time.strftime('%Y-%m-%d %H:%M:%S')}\ncommand: {' '.join(sys.argv)}\n"
            f"while: {context}\n\n" + "".join(traceback.format_exception(exc)))
    for folder in log_dirs(out_dir):
        try:
            if out_dir and folder.parent == Path(out_dir) and not Path(out_dir).is_dir():
                continue  # never create the output folder just to hold a log
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stamp}-{slug}-{os.getpid()}.log"
            with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(text)
            return path
        except OSError:
            continue
    return None


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 3] + "..."


def disk_full(path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has next to no space left."""
    import shutil

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < 1 << 20
    except OSError:
        return False


def write_failure(exc: BaseException, path=None) -> str:
    """Why writing failed, in a few words. torch.save raises RuntimeError and safetensors SafetensorError rather than
    OSError when the disk is full; the file system is asked in that case."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "the disk is full (No space left on device)"
        return exc.strerror or _first_line(exc) or type(exc).__name__
    if path is not None and disk_full(path):
        return "the disk is full (No space left on device)"
    return f"{type(exc).__name__}: {_first_line(exc)}"


# errno -> what to do, for the errors only a write raises: these name the file as one that could not be written.
_WRITE_ERRORS = {
    errno.ENOSPC: "Free some disk space (or choose an output folder on another disk) and try again.",
    getattr(errno, "EDQUOT", -1): "Your disk quota is used up: free some space or choose another output folder, and try again.",
    errno.EROFS: "That file system is read-only: choose an output folder you can write to.",
    errno.EFBIG: "The file is too large for that file system: choose an output folder on another disk.",
}


def write_failure_advice(exc: BaseException) -> str | None:
    """What to do about a failed write of a named file (an OSError only writes raise), else None."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return _WRITE_ERRORS.get(exc.errno)
    return None


def what_went_wrong(exc: BaseException) -> str:
    """One clause for an exception the library did not phrase itself."""
    if isinstance(exc, OSError):
        name = exc.filename
        reason = "the disk is full (No space left on device)" if exc.errno == errno.ENOSPC else (exc.strerror or _first_line(exc))
        if write_failure_advice(exc):
            return f"could not write '{shown(name)}': {reason}"
        if name is not None:
            other = f" -> '{shown(exc.filename2)}'" if exc.filename2 is not None else ""
            return f"'{shown(name)}'{other}: {reason}"
        return reason or type(exc).__name__
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory (lower batch_size or resolution, or close other programs)"
    if isinstance(exc, RecursionError):
        return "a file is nested too deeply to read (RecursionError)"
    detail = _first_line(exc)
    return f"{type(exc).__name__}: {shown(detail)}" if detail else type(exc).__name__


def describe(exc: BaseException, *, context: str, out_dir=None) -> str:
    """The sentence to show for `exc`. User errors: their own message. Anything else: context, cause, log file."""
    from .errors import USER_ERRORS

    if isinstance(exc, USER_ERRORS) and not isinstance(exc, OSError):
        return shown(str(exc))
    log = write_traceback(exc, context=context, out_dir=out_dir)
    where = f" The full error is in {shown(log)}." if log else ""
    advice = write_failure_advice(exc)
    if advice:
        clause = what_went_wrong(exc)
        return f"{shown(context)} failed. {clause[0].upper()}{clause[1:]}. {advice}{where}"
    return f"{shown(context)} failed: {what_went_wrong(exc)}.{where}"
