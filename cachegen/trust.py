"""What a cachegen command that reads a cache may run: nothing the manifest names, unless --trust-code."""

from __future__ import annotations

from pathlib import Path

from cacheaug.transforms import CacheFactory, cache_factory
from cachegen.sources import loads_pickles

# How a command's user lets a cache's code run; the one-line refusals end with it.
OPT_IN = "pass --trust-code if you trust whoever made this cache"


def trusted_factory(root: Path, manifest: dict, trust_code: bool) -> CacheFactory | None:
    """The factory `manifest` names, imported only with `trust_code` (from sys.path, never the
    current folder); None for a preset. TransformError (one line, with OPT_IN) otherwise."""
    return cache_factory(manifest["transform"], trust_code=trust_code, factory=None, where=str(root), opt_in=OPT_IN)


def pickled_source(manifest: dict) -> str | None:
    """Where `manifest`'s source would be unpickled to be read, in words ending in OPT_IN; None
    where reading it runs no code."""
    spec = manifest["source_spec"]["spec"]
    if not loads_pickles(spec):
        return None
    return f"the source the manifest names ({spec}), whose files are Python pickles that can run code; {OPT_IN}"
