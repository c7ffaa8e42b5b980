"""readers: stream a cachegen cache into device batches at page-cache speed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each public name and the module that defines it. They are imported on first use (PEP 562), so
# that `readers.manifest` or `readers.remote` (what `cachegen info` needs) does not import torch.
_EXPORTS = {"CachedLoader": "readers.cached", "CacheDataset": "readers.dataset", "ReaderError": "readers.errors",
            "LiveLoader": "readers.live", "open_loader": "readers.live", "Manifest": "readers.manifest",
            "load_manifest": "readers.manifest", "LoaderOptions": "readers.options",
            "BatchTransform": "readers.batch_transform", "BatchTransformError": "readers.batch_transform"}

__all__ = ["BatchTransform", "BatchTransformError", "CacheDataset", "CachedLoader", "LiveLoader", "open_loader", "LoaderOptions", "Manifest", "ReaderError", "load_manifest"]

if TYPE_CHECKING:
    from readers.batch_transform import BatchTransform, BatchTransformError
    from readers.cached import CachedLoader
    from readers.dataset import CacheDataset
    from readers.errors import ReaderError
    from readers.live import LiveLoader, open_loader
    from readers.manifest import Manifest, load_manifest
    from readers.options import LoaderOptions


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'readers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
