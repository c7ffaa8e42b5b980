"""The source of a cache that exists: where it is now, for the tools that read it again (bench,
preview, online augmentation).

A build records the source as the user spelt it (`source_spec.spec`) and, beside it, as an absolute
path (`source_spec.absolute`), so that a tool run from another folder finds it; a manifest written
before the absolute path was recorded is opened by its spec, relative to where the tool runs. A
source that has moved is given with `--source`, and checked against the fingerprint the build
recorded like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from cachegen.errors import CachegenError
from cachegen.sources import Source, printable, reopen
from cachegen.sources.torchvision import TORCHVISION_KINDS


def absolute_spec(spec: str | None) -> str | None:
    """`spec` with the path it names made absolute (a folder, a .npz, `kind:ROOT`); None for the
    built-in sample, which is no path."""
    if spec in (None, "", "sample"):
        return None
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in TORCHVISION_KINDS:
        return f"{kind}:{os.path.abspath(rest)}"
    return os.path.abspath(spec)


def where(m: dict, override: str | None = None) -> str | None:
    """The spec to open a cache's source by: `override` (--source), else the absolute path the build
    recorded, else (a manifest from before it was recorded) the spec as the user gave it."""
    recorded = m["source_spec"]
    return override if override is not None else recorded.get("absolute") or recorded["spec"]


def source_of(cache: Path, m: dict, override: str | None = None) -> Source:
    """The source `cache` was built from: `override` (a tool's --source) where given, else where the
    build recorded it; one line naming what is missing and how to point at it where it is not there,
    or where it is no longer the source the cache was built from."""
    recorded = m["source_spec"]
    if recorded.get("source_factory"):
        return reopen(recorded)  # refused in one line: reading a cache runs no code
    spec = where(m, override)
    try:
        source = reopen({**recorded, "spec": spec})  # its columns, as the build opened it
    except CachegenError as e:
        if override is not None:
            raise
        path = spec.partition(":")[2] if spec.partition(":")[0].lower() in TORCHVISION_KINDS else spec
        why = "" if not (path and os.path.exists(path)) else f" ({e})"
        raise CachegenError(f"the source of {printable(str(cache))} is not at {printable(str(spec))} any more{why}; "
                            "pass --source WHERE to say where it is now") from None
    if source.fingerprint() != m["source"]["fingerprint"]:
        said = "--source " + printable(str(spec)) if override is not None else printable(str(spec))
        raise CachegenError(f"the source of {printable(str(cache))} ({m['source']['description']}) has changed since "
                            f"the build ({said} is not what it was built from): pass --source with the same data")
    return source
