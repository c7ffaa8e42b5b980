"""What a reader may run: a live cache's `module:factory`, only when the user says so (docs/security.md)."""

from __future__ import annotations

from collections.abc import Callable

from cacheaug.transforms import CacheFactory, TransformError, cache_factory
from readers.errors import ReaderError
from readers.manifest import Manifest

# How a reader's user allows a cache's code to run, or runs their own copy of it instead.
OPT_IN = ("pass trust_code=True if you trust whoever made this cache, or pass the factory yourself "
          "(factory=make, imported from code you trust; checked against the recorded sha256)")


def reader_factory(manifest: Manifest, *, trust_code: bool, factory: Callable | None) -> CacheFactory | None:
    """The factory `manifest` names, as this reader may call it (None: a preset, nothing to run).

    Imports nothing the manifest names unless `trust_code` is True (and then from sys.path only,
    never the current folder); `factory` is the user's own copy, checked against the manifest's
    recorded sha256.

    Raises:
        ReaderError: a factory named and neither trusted nor given, or a given one that differs.
        ValueError: trust_code is not True or False.
    """
    if not isinstance(trust_code, bool):
        raise ValueError(f"trust_code must be True or False, got {trust_code!r}")
    try:
        return cache_factory(manifest.raw["transform"], trust_code=trust_code, factory=factory,
                             where=str(manifest.root), opt_in=OPT_IN)
    except TransformError as e:
        raise ReaderError(str(e)) from None
