"""Fault injection, so that crash and disk-full tests run real build processes anywhere (no root,
no tmpfs): set by the tests, never by users; each check costs one dictionary lookup when unset.

CACHEGEN_FAULT_KILL=<point>   the process kills itself (SIGKILL) on reaching the named point
                              (`kill_at`): a crash between two steps, exactly there.
CACHEGEN_FAULT_ENOSPC=<n>     the n-th write of cache data by this process (and by each worker
                              process: each counts its own) fails as a full disk; or a file name
                              (`manifest.json`): every write to a file of that name fails.
CACHEGEN_FAULT_NO_EXCHANGE=1  --overwrite swaps folders with two renames, as on a system without
                              an atomic exchange.
CACHEGEN_FAULT_FLAKY=<name>:<k>:<log>  the k-th read of the source image whose name ends with
                              <name> fails, reads counted across processes in the file <log>: a
                              read error in one epoch only (a transient one on NFS, a FUSE mount).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

_writes = 0


def kill_at(point: str) -> None:
    """Die here, as a power cut or kill -9 would stop the process, when the tests ask for it."""
    if os.environ.get("CACHEGEN_FAULT_KILL") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def before_write(path: Path) -> None:
    """Raise a full disk's OSError where CACHEGEN_FAULT_ENOSPC says this write fails."""
    global _writes
    fault = os.environ.get("CACHEGEN_FAULT_ENOSPC")
    if not fault:
        return
    _writes += 1
    if (fault.isdigit() and _writes == int(fault)) or (not fault.isdigit() and Path(path).name == fault):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def exchange_allowed() -> bool:
    return os.environ.get("CACHEGEN_FAULT_NO_EXCHANGE") != "1"


def before_read(source, index: int) -> None:
    """Raise a read error where CACHEGEN_FAULT_FLAKY says this read of a source image fails."""
    fault = os.environ.get("CACHEGEN_FAULT_FLAKY")
    if not fault:
        return
    name, k, log = fault.split(":", 2)
    if not source.name(index).endswith(name):
        return
    with open(log, "ab") as f:  # O_APPEND: one byte a read, whichever process reads
        f.write(b".")
        count = f.tell()
    if count == int(k):
        raise OSError(errno.EIO, f"injected read error ({count} reads of {name})")
