"""The readers' view of a cache: its manifest, checked by the contract (cacheformat)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from cacheformat import as_error
from cacheformat.index import ShardIndex, read_index
from cacheformat.manifest import Manifest, ShardEntry, check_files, identity, read_manifest
from readers.errors import ReaderError

Shard = ShardEntry  # a shard as the manifest lists it

__all__ = ["Manifest", "Shard", "ShardIndex", "cache_digest", "load_manifest", "load_index", "live_shards"]


def load_manifest(root: str | Path, sizes: Mapping[str, int] | None = None) -> Manifest:
    """Read `root/manifest.json` and check it against the format (docs/FORMAT.md).

    Then every shard and index file must be there and the size the manifest says (a stat each,
    or for a remote cache staged in `root`, its listing's `sizes`: relative path -> bytes): the
    manifest's numbers are bounded by real files before a loader plans an epoch.

    Raises:
        ReaderError: no manifest, unreadable JSON, a cache of another format version, a field
            that breaks the format, or a file of another size, named.
    """
    with as_error(ReaderError):
        manifest = read_manifest(root)
        check_files(manifest, sizes)  # O(shards) stats, before anything costs O(samples)
    return manifest


def load_index(manifest: Manifest, shard: Shard) -> ShardIndex:
    """`shard`'s per-sample index, checked against the manifest; ReaderError naming it where not."""
    with as_error(ReaderError):
        return read_index(manifest, shard)


def live_shards(manifest: Manifest) -> tuple[Shard, ...]:
    """The source-pass shards of a live cache (un-augmented images, keys src_*).

    Raises:
        ReaderError: the cache is not a live one.
    """
    if manifest.mode != "live":
        raise ReaderError(f"{manifest.root} is a {manifest.mode!r}-mode cache: it has no source pass to augment live")
    return manifest.source_shards


def cache_digest(manifest: Manifest) -> str:
    """A sha256 naming the samples a cache holds: its identity (source, transform, seed, image,
    shard size, mode, library versions: cacheformat.manifest.identity) and every shard's sha256,
    in manifest order. Not where it lies: a copy elsewhere, or a remote cache staged locally, has
    the digest of the original; the same build re-run (same bytes) too."""
    named = {"identity": identity(manifest.raw), "shards": [s.sha256 for s in manifest.all_shards()]}
    return hashlib.sha256(json.dumps(named, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
