"""What a cachegen command that reads a cache may run: nothing the manifest names, unless --trust-code.

(The source a manifest names is data too: torchvision unpickles CIFAR's files only once their md5
matches the published dataset's, so a cache cannot plant code there.)"""

from __future__ import annotations

from pathlib import Path

from cacheaug.transforms import CacheFactory, cache_factory

# How a command's user lets a cache's code run; the one-line refusals end with it.
OPT_IN = "pass --trust-code if you trust whoever made this cache"


def trusted_factory(root: Path, manifest: dict, trust_code: bool) -> CacheFactory | None:
    """The factory `manifest` names, imported only with `trust_code` (from sys.path, never the
    current folder); None for a preset. TransformError (one line, with OPT_IN) otherwise."""
    return cache_factory(manifest["transform"], trust_code=trust_code, factory=None, where=str(root), opt_in=OPT_IN)

