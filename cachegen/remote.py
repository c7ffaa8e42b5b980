"""`cachegen info` and `verify` over a cache at a URL (s3://..., any fsspec protocol): its files
fetched into a temporary folder first (the manifest only for info; every file it lists, as they
are, for verify to judge), through the readers' Stager (same credentials, retries, one-line errors)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cacheformat.layout import index_path
from readers.manifest import load_manifest
from readers.remote import Stager, is_url


@contextmanager
def local_view(cache: str | Path, *, files: bool = False) -> Iterator[Path]:
    """A local folder holding the cache `cache` (a path: itself), with every listed file if `files`."""
    if not is_url(cache):
        yield Path(str(cache).removeprefix("file://"))
        return
    with tempfile.TemporaryDirectory(prefix="cachegen-") as tmp:
        stager = Stager(str(cache), tmp)
        if files:
            for shard in load_manifest(stager.root).all_shards():
                for rel in (shard.relpath, index_path(shard.relpath)):
                    stager.copy(rel)
        yield stager.root


def named(text: str, root: Path, cache: str | Path) -> str:
    """`text` with the local folder's path spelt as the cache's URL."""
    return text.replace(str(root), str(cache).rstrip("/"))
