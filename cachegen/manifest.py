"""The builder's side of the contract (cacheformat): write the manifest and index files atomically,
read a cache's manifest back for the builder and its tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cacheformat import FormatError, as_error
from cacheformat import manifest as contract
from cacheformat.layout import TMP_MARK
from cacheformat.manifest import (BUILD_STATE, FORMAT, FORMAT_VERSION, MANIFEST, Manifest,  # noqa: F401 - re-exported
                                  describe_difference, identity)
from cachegen import faults
from cachegen.errors import CachegenError


def write_atomic(path: Path, data: bytes, *, sync_folder: bool = True) -> None:
    """Write `data` to a temp file, fsync, rename over `path` (then fsync the folder, unless
    `sync_folder` is False: an index file, like its shard, is made durable by the manifest's
    write; the folder's fsync costs a few ms per shard): all or nothing."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            faults.before_write(path)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_folder(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CachegenError(f"cannot write {path}: {e.strerror or e}; free space or fix permissions, "
                            "then re-run the same command to resume") from None


def fsync_folder(folder: Path) -> None:
    """fsync `folder`: the renames into it (a shard's, the manifest's) survive a power cut once
    this returns."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, manifest: dict, folders) -> None:
    """Commit a build: check `manifest` with the readers' own contract (every field, the bounds,
    each listed file there and of its size: cacheformat), fsync every shard folder in `folders`
    (relative to `root`), so no rename a manifest relies on can be lost, then write it atomically.

    Raises:
        CachegenError: the manifest would be refused by the readers (a cachegen bug: nothing is
            written, the shards are kept), or it cannot be written.
    """
    with as_error(CachegenError, lambda text: f"the build made a manifest its readers would refuse, so it was not "
                                              f"written ({text}); the shards are kept: report this as a cachegen bug"):
        checked = contract.parse_manifest(json.loads(json.dumps(manifest)), root)  # as a reader gets it
        contract.check_files(checked)
        missing = [s.relpath for s in checked.all_shards() if not (s.path.is_file() and s.index_path.is_file())]
        if missing:
            raise FormatError(f"shard {missing[0]} or its index is missing")
    for folder in sorted(set(folders)):
        fsync_folder(root / folder)
    write_json_atomic(root / MANIFEST, manifest)


def write_json_atomic(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, separators=(",", ":")).encode())


@as_error(CachegenError)
def read_json(path: Path) -> dict:
    return contract.read_json(path)


def load_manifest(root: Path) -> Manifest:
    """The checked manifest of the cache at `root` (a CachegenError names what is missing or wrong)."""
    with as_error(CachegenError):
        return contract.read_manifest(root)


def read_manifest(root: Path) -> dict:
    """The checked manifest of the cache at `root`, as JSON."""
    return load_manifest(root).raw
