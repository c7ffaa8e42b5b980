"""What a reader may run: a live cache's `module:factory`, only when the user says so (docs/security.md)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

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


_SAFE_PATH_LOCK = threading.Lock()


@contextlib.contextmanager
def no_cwd_in_children() -> Iterator[None]:
    """While worker processes start: PYTHONSAFEPATH=1 in the environment they inherit.

    A spawn or forkserver child is a fresh interpreter started as `python -c ...`, which puts the
    working directory first on sys.path, and the first thing it imports is `multiprocessing`: run in
    a cache folder, a `multiprocessing.py` there would run in every worker, before any of our code.
    PYTHONSAFEPATH (Python 3.11+, `-P`) leaves it off; the child's sys.path is then the parent's,
    as multiprocessing sets it. (Python 3.10 has no such switch.) A forked child is a copy of the
    parent and imports nothing anew. Other threads starting processes meanwhile inherit it too.
    """
    with _SAFE_PATH_LOCK:
        before = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = before
