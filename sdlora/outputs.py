"""Where results go: refuse output paths that would replace a folder or a special file, and lock an output folder so
two runs never write into it at once."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import time
from pathlib import Path

from .errors import UserError
from .safetext import shown

LOCK_NAME = ".sdlora.lock"


class OutputError(UserError, ValueError):
    """An output path that cannot be used; the message names it and says what to do."""


def _first_existing_parent(path: Path) -> Path:
    p = path.parent
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_file(path, *, what: str = "output file") -> Path:
    """Refuse a path that is a folder or a special file (device, pipe, socket), or that lies under a file.

    A regular file (or a link to one) may be replaced; the atomic writer replaces the name, never the target."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise OutputError(f"{what} '{shown(path)}' is a folder name; give a file name, e.g. '{shown(path / 'out')}'.")
    try:
        st = os.stat(path)  # follows a link: a link to /dev/null is as bad as /dev/null
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file where a folder should be (named below)
        st = None
    except OSError as exc:
        raise OutputError(f"{what} '{shown(path)}' cannot be used: {exc.strerror or exc}.") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} '{shown(path)}' is a folder; give a file path inside it, e.g. "
                              f"'{shown(path / ('out' + (path.suffix or '')))}'.")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} '{shown(path)}' is a special file (device, pipe or socket), not a regular file; "
                              "sdlora never replaces those. Give a normal file path.")
    parent = _first_existing_parent(path)
    if not parent.is_dir():
        raise OutputError(f"{what} '{shown(path)}' cannot be created: '{shown(parent)}' is a file, not a folder.")
    return path


def check_output_dir(path, *, what: str = "output_dir") -> Path:
    """Refuse an output folder that is an existing file (or special file) or lies under one."""
    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise OutputError(f"{what} '{shown(path)}' cannot be used: {exc.strerror or exc}.") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "a special file (device, pipe or socket)"
        raise OutputError(f"{what} '{shown(path)}' is {kind}, not a folder. Choose a folder for the results "
                          "(it is created if missing).")
    if st is None:
        parent = _first_existing_parent(path)
        if not parent.is_dir():
            raise OutputError(f"{what} '{shown(path)}' cannot be created: '{shown(parent)}' is a file, not a folder.")
    return path


# the output-folder lock ------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read_owner(lock: Path) -> dict:
    try:
        data = json.loads(lock.read_text(encoding="utf-8", errors="replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy_message(out_dir: Path, owner: dict) -> str:
    pid = owner.get("pid")
    since = owner.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) else ""
    who = ("another run in this program" if pid == os.getpid() else
           f"another sdlora run (process {pid}{' on ' + str(owner['host']) if owner.get('host') not in (None, socket.gethostname()) else ''}{when})"
           if pid else "another sdlora run")
    return (f"Output folder '{shown(out_dir)}' is in use by {who}. Wait for that run to finish or stop it, or choose "
            f"another output folder. (If no run is using it, delete '{shown(out_dir / LOCK_NAME)}'.)")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by someone else; None: this file system cannot lock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


@contextlib.contextmanager
def output_lock(out_dir, *, what: str = "output_dir"):
    """Hold OUT/.sdlora.lock for the block. The file names the owner (pid, host, start time); the lock itself is an
    flock, so a run that died (even by kill -9) leaves nothing that blocks the next one: its stale file is taken over.
    Where flock is unavailable, a lock file whose pid is no longer running counts as stale."""
    out_dir = check_output_dir(Path(out_dir), what=what)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    fd = None
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        got = _try_flock(fd)
        if got is False:
            owner = _read_owner(lock)
            os.close(fd)
            raise OutputError(_busy_message(out_dir, owner))
        if got is None:  # no flock here: judge by the recorded pid
            owner = _read_owner(lock)
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid) and owner.get("host", socket.gethostname()) == socket.gethostname():
                os.close(fd)
                raise OutputError(_busy_message(out_dir, owner))
        try:  # the file may have been removed and recreated by its last owner between open and flock: lock the live one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = None
    if fd is None:
        raise OutputError(_busy_message(out_dir, _read_owner(lock)))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError:
        pass  # a full disk: the flock still holds; only the owner's name is missing from the file
    try:
        yield lock
    finally:
        try:
            if _read_owner(lock).get("pid") == me["pid"]:
                lock.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)
