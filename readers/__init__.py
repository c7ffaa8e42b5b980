"""readers: stream a cachegen cache into device batches at page-cache speed."""

from readers.cached import CachedLoader
from readers.errors import ReaderError
from readers.manifest import Manifest, load_manifest
from readers.options import LoaderOptions

__all__ = ["CachedLoader", "LoaderOptions", "Manifest", "ReaderError", "load_manifest"]
