"""The user's own map-style Dataset (`--source-factory FILE.py:make` or `module:make`): code, run at build
time only, like a --transform factory; the cache it builds is data, like any other."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.sources.base import Source, printable
from cachegen.sources.images import GRAY_MODES
from cachegen.sources.npz import MAX_UNNAMED_CLASSES
from cachegen.sources.progress import opening
from cacheaug.transforms import load_callable, source_sha256

USAGE = "make() -> a map-style Dataset whose items are (PIL image | uint8 tensor CHW | uint8 array HWC, int label)"
FINGERPRINT_ITEMS = 16  # items spread over the dataset whose pixels join its identity


class FactorySource(Source):
    """The Dataset a `--source-factory` returns. Its identity (the cache's source fingerprint, which a
    resume or a growth must match): the sha256 of the factory's source file, the length, the labels and
    the pixels of FINGERPRINT_ITEMS items spread over it.

    It pickles as its spec, not its Dataset: a worker that receives it (spawned, or on Dask) calls the
    factory itself, once, and refuses a factory whose source file is no longer the one this build began with."""

    def __init__(self, spec: str, *, quiet: bool = True) -> None:
        self.spec = _portable(spec)
        factory = load_callable(self.spec, "--source-factory", USAGE)
        self.sha256 = source_sha256(factory)
        self.dataset = _call(factory, spec)
        n = _length(self.dataset, spec)
        if n == 0:
            raise CachegenError(f"--source-factory {spec}: the Dataset is empty")
        self.kind, self.description = "factory", printable(f"Dataset from --source-factory {spec}")
        self.labels = _labels(self, n, quiet)
        known = [k for k in self.labels.tolist() if k >= 0]
        if not known:
            raise CachegenError(f"--source-factory {spec}: none of its {n} items could be read")
        classes = getattr(self.dataset, "classes", None)
        if classes is not None:
            self.classes = tuple(str(c) for c in classes)
        elif max(known) >= MAX_UNNAMED_CLASSES:
            raise CachegenError(f"--source-factory {spec}: labels run up to {max(known)}; number the classes 0..K-1 "
                                "or give the Dataset a `classes` list")
        else:
            self.classes = tuple(str(k) for k in range(max(known) + 1))
        if max(known) >= len(self.classes):
            raise CachegenError(f"--source-factory {spec}: label {max(known)} is past its {len(self.classes)} classes")
        first = int(np.flatnonzero(self.labels >= 0)[0])
        try:
            same = np.array_equal(np.asarray(self.load(first)), np.asarray(self.load(first)))
        except Exception as e:  # an item that is no image: said now, not as an unreadable item in every worker
            raise CachegenError(f"--source-factory {spec}: item {first}: {type(e).__name__}: {e}") from None
        if not same:
            raise CachegenError(f"--source-factory {spec}: item {first} differs each time it is read (a random "
                                "transform inside?); return the images as they are: cachegen augments them")
        self._fingerprint = self._identity()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "dataset": None}

    def _opened(self):
        if self.dataset is None:  # in a worker: the factory called again, if it is still the same code
            factory = load_callable(self.spec, "--source-factory", USAGE)
            if source_sha256(factory) != self.sha256:
                raise CachegenError(f"--source-factory {self.spec}: its source file changed since the build began "
                                    f"(pid {os.getpid()}); re-run the build")
            self.dataset = _call(factory, self.spec)
            if _length(self.dataset, self.spec) != len(self.labels):
                raise CachegenError(f"--source-factory {self.spec} made {len(self.dataset)} items here, "
                                    f"{len(self.labels)} where the build began: it must make the same Dataset")
        return self.dataset

    def item(self, index: int):
        item = self._opened()[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"item {index} is a {type(item).__name__}, not an (image, label) pair ({USAGE})")
        return item

    def load(self, index: int) -> Image.Image:
        if self.labels[index] < 0:  # its label is unknown: read once more now, it would be stored without one
            raise OSError("it could not be read when the labels were")
        return to_image(self.item(index)[0])

    def name(self, index: int) -> str:
        return f"item {index} of the Dataset from --source-factory {printable(self.spec)}"

    def fingerprint(self) -> str:
        return self._fingerprint

    def _identity(self) -> str:
        h = hashlib.sha256(f"{self.sha256}|{len(self.labels)}|{self.classes}".encode())
        h.update(self.labels.tobytes())
        for index in dict.fromkeys(np.linspace(0, len(self.labels) - 1, FINGERPRINT_ITEMS).round().astype(int).tolist()):
            try:
                image = self.load(index)
                h.update(f"{index}|{image.mode}|{image.size}|".encode() + image.tobytes())
            except Exception:  # an unreadable item: --on-error decides when it is read
                h.update(f"{index}|unreadable".encode())
        return h.hexdigest()


def to_image(image) -> Image.Image:
    """An item's image as a PIL image (L or RGB): a PIL image, a uint8 tensor (C, H, W) or (H, W) as
    torchvision's, or a uint8 array (H, W, C) or (H, W) as PIL's and numpy's."""
    if isinstance(image, Image.Image):
        return image.convert("L" if image.mode in GRAY_MODES else "RGB")
    import torch

    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy(force=True)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"the image is a {type(image).__name__} {getattr(image, 'dtype', '')}: give a PIL image or "
                        "uint8 pixels (a tensor C,H,W or an array H,W,C)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) or 0 in image.shape:
        raise TypeError(f"the image has shape {image.shape}: give H,W or H,W,C pixels (C,H,W for a tensor), "
                        "C in 1, 3, 4")
    return Image.fromarray(np.ascontiguousarray(image)).convert("L" if image.ndim == 2 else "RGB")


def _portable(spec: str) -> str:
    """A FILE.py spec with the file's absolute path: a worker (spawned, or a Dask one) runs elsewhere."""
    where, _, attr = spec.rpartition(":")
    return f"{os.path.abspath(where)}:{attr}" if where.endswith(".py") else spec


def _call(factory, spec: str):
    try:
        dataset = factory()
    except Exception as e:
        raise CachegenError(f"--source-factory {spec} failed: {type(e).__name__}: {e}") from None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise CachegenError(f"--source-factory {spec} returned a {type(dataset).__name__}, not a map-style Dataset "
                            f"(__len__ and __getitem__): {USAGE}")
    return dataset


def _length(dataset, spec: str) -> int:
    try:
        return int(len(dataset))
    except Exception as e:
        raise CachegenError(f"--source-factory {spec}: len() of its Dataset failed ({type(e).__name__}: {e}); "
                            f"{USAGE}") from None


def _labels(source: FactorySource, n: int, quiet: bool) -> np.ndarray:
    """Every item's label: its Dataset's `targets` where it lists them (torchvision's do), else read
    from each item (one pass over the Dataset); -1 for an item that cannot be read."""
    targets = getattr(source.dataset, "targets", None)
    if targets is not None and len(targets) == n:
        labels = np.asarray([_label(t, i, source.spec) for i, t in enumerate(targets)], np.int64)
    else:
        labels = np.empty(n, np.int64)
        for index in opening(range(n), total=n, desc="cachegen: reading the Dataset's labels", quiet=quiet):
            try:
                item = source.item(index)
            except Exception:  # unreadable: load() raises again, and --on-error decides
                labels[index] = -1
                continue
            labels[index] = _label(item[1], index, source.spec)
    return labels


def _label(value, index: int, spec: str) -> int:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise CachegenError(f"--source-factory {spec}: item {index}'s label {str(value)[:20]!r} is not a class "
                            "number 0..K-1")
    return int(value)
