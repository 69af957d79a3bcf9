"""One writer per output folder: a range being trained, merged/, a samples/<model>/ folder.

`hold(lock_file, what)` takes an exclusive `flock` on the lock file for as long as the block runs and writes the
holder (PID, host, start time, command) into it. A second process asking for the same lock is refused at once with
a UsageError naming the holder. The operating system releases a flock when its process dies, however it dies, so a
lock left by a dead process is simply taken over, with a warning naming the process that left it. On a filesystem
without flock support (some network filesystems) the holder's PID is checked instead: a live process on this host,
or any process on another host, keeps the lock; delete the file by hand when you know that process is gone.

Only the main process of an `accelerate launch` job takes locks (the others write nothing the lock protects).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from . import ui
from .errors import UsageError

LOCK_NAME = ".lock"


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv[:4])}) + "\n"


def _read(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        out = json.loads(raw.decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    return out if isinstance(out, dict) and "pid" in out else None


def _alive(holder: dict) -> bool:
    """Whether the holder may still be running (a process on another host cannot be checked: assume it is)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"


def _write(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, _holder_text().encode())
    os.fsync(fd)


@contextmanager
def hold(lock_file: Path, what: str, main: bool = True) -> Iterator[None]:
    """Hold the lock of `what` (words for messages, like "range 0 of 'runs/x'") while the block runs.

    `main`: False in the non-main processes of a distributed job, which take no lock."""
    if not main:
        yield
        return
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{what} is being written by {_describe(_read(fd))}; wait for it to finish or stop it, "
                             f"or use another --out") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            flocked = False             # no flock here: fall back to checking the holder's PID
        left = _read(fd)
        if left and int(left.get("pid", -1)) != os.getpid():
            if not flocked and _alive(left):
                raise UsageError(f"{what} is being written by {_describe(left)}; wait for it to finish or stop it, "
                                 f"or, if it is no longer running, delete '{lock_file}'")
            ui.warn(f"{what}: took over the lock left by {_describe(left)}, which is no longer running")
        _write(fd)
        try:
            yield
        finally:
            if (_read(fd) or {}).get("pid") == os.getpid():
                os.ftruncate(fd, 0)          # released: the next holder has nothing to take over
    finally:
        os.close(fd)                          # releases the flock
