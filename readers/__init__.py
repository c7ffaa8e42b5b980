"""readers: stream a cachegen cache into device batches at page-cache speed."""

from readers.batch_transform import BatchTransform, BatchTransformError
from readers.cached import CachedLoader
from readers.dataset import CacheDataset
from readers.errors import ReaderError
from readers.live import LiveLoader, open_loader
from readers.manifest import Manifest, load_manifest
from readers.options import LoaderOptions

__all__ = ["BatchTransform", "BatchTransformError", "CacheDataset", "CachedLoader", "LiveLoader", "open_loader", "LoaderOptions", "Manifest", "ReaderError", "load_manifest"]
