"""The output folder of a build: checked against the build, locked while it runs, temporaries
removed, and --overwrite's staging folder swapped in for the old cache."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import time
from pathlib import Path

from cachegen import faults
from cachegen.errors import CachegenError
from cacheformat.locks import BUILD_LOCK, builder, lock_file
from cacheformat.teacher import canonical_spec
from cachegen.manifest import (BUILD_STATE, MANIFEST, describe_difference, fsync_folder, identity, read_json,
                               read_manifest)
from cachegen.shards import TMP_MARK


LOCK = BUILD_LOCK  # in --out while a build runs: flock'ed, holding the builder's pid
LOCK_TRIES = 5  # a reader asking who builds a cache holds a shared lock for an instant: try again
REPLACED = ".cachegen-replaced"  # in a cache an --overwrite is swapping out: what is left of it is deleted


_LOCK_FD: int | None = None  # the build lock's descriptor, which forked workers close


@contextlib.contextmanager
def build_lock(root: Path):
    """Hold the build lock on `root` (an existing folder) for one build, or fail at once naming the
    build that holds it. A lock left by a killed build is no lock: the kernel drops an flock with its
    holder, and the next build takes it over."""
    global _LOCK_FD
    path = root / LOCK
    for attempt in range(LOCK_TRIES):
        try:
            fd = lock_file(path, blocking=False)
        except OSError as e:
            raise CachegenError(f"cannot write to --out {root}: {e.strerror or e}; choose a writable folder") from None
        if fd is not None or builder(root) is not None:  # taken, or taken by a build (not a passing reader)
            break
        time.sleep(0.02 * (attempt + 1))
    if fd is None:
        try:
            holder = path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise CachegenError(f"another cachegen build (pid {holder}) is writing {root}; wait for it to end "
                            "(or stop it), then re-run")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCK_FD = fd
    try:
        yield
    finally:
        _LOCK_FD = None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:  # --overwrite: went with the old cache
            pass
        os.close(fd)


def close_inherited_lock() -> None:
    """In a worker forked while the build lock is held: close its copy of the descriptor, so that
    the lock is the main process's alone."""
    if _LOCK_FD is not None:
        os.close(_LOCK_FD)


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test{TMP_MARK}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CachegenError(f"cannot write to --out {root}: {e.strerror or e}; choose a writable folder") from None


def prepare_out(root: Path, meta: dict) -> dict | None:
    """Check the output folder against this build; return the existing manifest, if compatible."""
    manifest_path, state_path = root / MANIFEST, root / BUILD_STATE
    existing = None
    if manifest_path.exists():
        existing = read_json(manifest_path)
    elif state_path.exists():
        existing = read_json(state_path)
    elif root.is_dir() and any(child.name != LOCK for child in root.iterdir()):
        raise CachegenError(f"--out {root} is not empty and holds no cachegen cache; choose an empty or new folder")
    teacher = (existing or {}).get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("spec"), str):
        # Recorded before teacher files were named by absolute path: compared as this build names it.
        teacher["spec"] = canonical_spec(teacher["spec"])
    if existing is not None and identity(existing) != identity(meta):
        raise CachegenError(f"{root} holds a different cache (differs in: "
                            f"{describe_difference(existing, meta)}); use --overwrite to replace it, "
                            "or another --out")
    if existing is not None and manifest_path.exists():
        existing = read_manifest(root)
        for epoch, (old, new) in enumerate(zip(existing["epoch_fingerprints"], meta["epoch_fingerprints"])):
            if old != new:
                raise CachegenError(f"{root}: epoch {epoch} would now be augmented differently "
                                    "(the schedule or factory depends on --epochs); use --overwrite to rebuild")
        return existing
    return None


def holds_cache(root: Path) -> bool:
    return (root / MANIFEST).exists() or (root / BUILD_STATE).exists()


def built_epochs(root: Path) -> int:
    """How many epochs the cache at `root` already has (0 where there is none, or it is unreadable)."""
    try:
        return int(read_manifest(root)["epochs"]) if (root / MANIFEST).exists() else 0
    except CachegenError:
        return 0


def remove_temporaries(root: Path) -> None:
    """Delete the temporaries a build leaves in `root` and its epoch folders; a link (to a folder
    outside, or a file) is never followed: what it points at is not the cache's."""
    folders = [root, *(entry for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink())]
    for folder in folders:
        for tmp in folder.glob(f"*{TMP_MARK}*"):
            tmp.unlink(missing_ok=True)


def staging_folder(root: Path, meta: dict) -> tuple[Path, dict | None]:
    """Where an --overwrite build writes while the old cache stays in place: a hidden sibling on the
    same file system, resumed when it holds this very build's interrupted work, else emptied."""
    work = root.parent / f".{root.name}.building"
    try:
        return work, prepare_out(work, meta)
    except CachegenError:  # another build's leftovers: ours to discard, under the lock on `root`
        shutil.rmtree(work) if work.is_dir() else work.unlink()
        return work, None


def swapped_path(out: Path) -> Path:
    """The folder an --overwrite swaps for `out`: every link resolved (`--out .` too: the real folder
    has a name and a parent, beside which the new cache is built). The swap and the recovery of an
    interrupted one both use it, so that they agree on where the halves are."""
    return out.resolve()


def replace_cache(root: Path, work: Path) -> None:
    """Put the complete cache in `work` in the place of the old one in `root`, then delete the old.

    At every instant `root` holds the old cache or the new one: one atomic exchange where the
    system has it (Linux), else two renames, which the next build finishes if a crash falls
    between them (finish_swap). The old cache is marked first, so what a crash leaves of it is
    known for what it is and deleted by the next build."""
    old = root.parent / f".{root.name}.replaced-{os.getpid()}"
    (root / REPLACED).touch()
    if _exchange(work, root):
        faults.kill_at("swap:exchanged")
        os.rename(work, old)
    else:
        os.rename(root, old)
        faults.kill_at("swap:old-moved")
        os.rename(work, root)
    fsync_folder(root.parent)
    faults.kill_at("swap:replaced")
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not faults.exchange_allowed() or not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library without it (glibc < 2.28, musl)
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def finish_swap(root: Path) -> None:
    """Finish an --overwrite swap a crash interrupted, before anything else looks at `root`: where
    `root` is missing and the old cache was moved aside, the new one goes in its place if it is
    complete, else the old one comes back; then what is left of swapped-out caches is deleted."""
    parent = root.parent
    if not parent.is_dir():
        return
    work = parent / f".{root.name}.building"
    replaced = sorted(parent.glob(f".{glob.escape(root.name)}.replaced-*"), key=lambda p: p.stat().st_mtime)
    if not root.exists() and replaced:
        os.rename(work if (work / MANIFEST).is_file() else replaced.pop(), root)
        fsync_folder(parent)
    if (work / REPLACED).exists():  # an exchange happened, the old cache was not yet moved on
        replaced.append(work)
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)
