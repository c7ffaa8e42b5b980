"""File locks (flock) shared by the builder and the readers: one helper, one set of rules."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUILD_LOCK = ".cachegen-lock"  # in a cache's folder while a build writes it: flock'ed, holding the builder's pid


def lock_file(path: str | Path, *, shared: bool = False, blocking: bool = True) -> int | None:
    """Open `path` (created if needed) and flock it, exclusive or `shared`; return the descriptor
    (closing it releases the lock), or None when not `blocking` and another holder has it.

    The kernel drops a lock with its holder (a killed process leaves no stale lock). A holder may
    unlink the file when done: a lock taken on a file no longer under its name is dropped and taken
    again on the new one, so two holders never lock two files of one name."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def locked(path: str | Path, *, shared: bool = False) -> Iterator[int]:
    """Hold a lock on `path` (lock_file, blocking) for the `with` block."""
    fd = lock_file(path, shared=shared)
    try:
        yield fd
    finally:
        os.close(fd)


def builder(root: str | Path) -> str | None:
    """The pid (as text; "unknown" where the file does not say) of the cachegen build writing the
    folder `root` now, or None where no build holds its lock (none runs, or one was killed: its
    lock went with it). Creates nothing, follows no symlink, reads at most 32 bytes.

    A shared lock is tried for an instant: a build starting in that instant retries its own
    (cachegen.outdir.build_lock)."""
    try:
        fd = os.open(Path(root) / BUILD_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            return pid if pid.isdigit() else "unknown"
        return None
    finally:
        os.close(fd)
