"""Sources: the built-in sample, an ImageFolder tree, torchvision's on-disk datasets, or a .npz."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.transforms import to_pil
from cachegen.sample import SAMPLE_SEED, SAMPLE_SIZE, SAMPLE_TEST_SIZE, make_sample

# torchvision's dataset classes and the folder each expects under its root (download=False).
TORCHVISION_KINDS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "mnist": ("MNIST", "MNIST/raw"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw"),
}


class Source:
    """A random-access dataset of (PIL image, int label), picklable so workers can load from it."""

    kind: str
    description: str
    classes: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, known without loading any image

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """How to point a user at one sample in an error message."""
        return f"sample {index} of {self.description}"

    @property
    def image_size(self) -> int | None:
        """Side length to use when no --size is given, where the source has one fixed size."""
        return None


class ArraySource(Source):
    """Images held in memory as one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *,
                 kind: str, description: str) -> None:
        self.images, self.labels = images, labels
        self.classes, self.kind, self.description = tuple(classes), kind, description
        self._fingerprint: str | None = None

    def load(self, index: int) -> Image.Image:
        image = self.images[index]
        return Image.fromarray(image) if image.ndim == 2 else to_pil(image)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.images.shape}|{self.classes}".encode())
            h.update(np.ascontiguousarray(self.images).data)
            h.update(self.labels.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def image_size(self) -> int:
        return int(min(self.images.shape[1:3]))


class FolderSource(Source):
    """An ImageFolder tree: one sub-folder per class; images are decoded lazily, in the workers."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as e:
            raise CachegenError(f"no images in {root}: expected one sub-folder of images per class ({e})") from None
        self.root = root
        self.paths = [p for p, _ in folder.samples]
        self.labels = np.asarray(folder.targets, dtype=np.int64)
        self.classes = tuple(folder.classes)
        self.kind, self.description = "folder", f"ImageFolder {root}"

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.paths:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _from_npz(path: Path) -> ArraySource:
    try:
        data = np.load(path, allow_pickle=False)
        missing = [k for k in ("images", "labels") if k not in data.files]
        if missing:
            raise CachegenError(f"{path} has no array {missing[0]!r}: a .npz source needs 'images' "
                                "(N,H,W[,C] uint8) and 'labels'")
        images, labels = data["images"], data["labels"]
        names = [str(c) for c in data["classes"]] if "classes" in data.files else None
    except CachegenError:
        raise
    except Exception as e:
        raise CachegenError(f"cannot read {path} as .npz: {e}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise CachegenError(f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C) with C in 1,3,4; "
                            f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise CachegenError(f"{path}: 'labels' must be {len(images)} integers, one per image; got {labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise CachegenError(f"{path} holds no images")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CachegenError(f"{path}: labels must lie in 0..{num_classes - 1} (one per class name); "
                            f"found {labels.min()}..{labels.max()}")
    classes = tuple(names) if names is not None else tuple(str(i) for i in range(num_classes))
    return ArraySource(images, labels.astype(np.int64), classes, kind="npz", description=f"npz {path}")


def _from_torchvision(kind: str, root: Path, split: str) -> ArraySource:
    import torchvision.datasets as D

    class_name, expected = TORCHVISION_KINDS[kind]
    try:
        ds = getattr(D, class_name)(str(root), train=(split == "train"), download=False)
    except RuntimeError:
        raise CachegenError(f"{class_name} files not found: expected them under {root / expected} "
                            "(nothing is downloaded; place the torchvision layout there)") from None
    images = np.asarray(ds.data, dtype=np.uint8)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ArraySource(images, labels, tuple(ds.classes), kind=kind, description=f"{class_name} {split} {root}")


def _detect(root: Path) -> str | None:
    for kind, (_, expected) in TORCHVISION_KINDS.items():
        if (root / expected).is_dir():
            return kind
    return None


def open_source(spec: str | None, *, split: str = "train") -> Source:
    """Open a source from its spec: None/'sample', 'cifar10:ROOT' (and cifar100, mnist,
    fashionmnist), a .npz file, or a folder (torchvision layout detected, else ImageFolder)."""
    if spec in (None, "", "sample"):
        n, seed = (SAMPLE_SIZE, SAMPLE_SEED) if split == "train" else (SAMPLE_TEST_SIZE, SAMPLE_SEED + 1)
        images, labels, classes = make_sample(n, seed=seed)
        return ArraySource(images, labels, classes, kind="sample",
                           description=f"built-in sample ({split}): {n} 32x32 shapes")
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in TORCHVISION_KINDS:
        return _from_torchvision(kind.lower(), Path(rest), split)
    path = Path(spec)
    if not path.exists():
        raise CachegenError(f"source {spec} does not exist: give a folder, a .npz, "
                            f"'{{cifar10,cifar100,mnist,fashionmnist}}:ROOT' or 'sample'")
    if path.is_file():
        if path.suffix != ".npz":
            raise CachegenError(f"source {spec} is a file but not a .npz: give a folder or a .npz")
        return _from_npz(path)
    detected = _detect(path)
    if detected:
        return _from_torchvision(detected, path, split)
    return FolderSource(path)


__all__ = ["ArraySource", "FolderSource", "Source", "open_source"]
