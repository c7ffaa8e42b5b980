"""File locks (flock) shared by the builder and the readers: one helper, one set of rules."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
