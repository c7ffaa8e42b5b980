"""Opening a cache's files for reading: regular files only, never a wait.

`open()` of a FIFO blocks until something writes to it, and a device file (`/dev/zero`) reads
for ever: a cache folder is untrusted, so each of its files is opened non-blocking and refused,
before anything is read, where it is not a regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def open_regular(path: str | Path, buffering: int = -1) -> BinaryIO:
    """`open(path, "rb", buffering)` for a regular file; OSError (IsADirectoryError for a folder)
    naming what is there instead, without waiting on it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO or device file is in its place)", str(path))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=buffering)
