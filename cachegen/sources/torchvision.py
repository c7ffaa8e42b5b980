"""torchvision's on-disk datasets (CIFAR-10/100, MNIST, Fashion-MNIST), never downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cachegen.errors import CachegenError
from cachegen.sources.array import ArraySource
from cachegen.sources.base import printable

# torchvision's dataset classes and the folder each expects under its root (download=False).
TORCHVISION_KINDS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "mnist": ("MNIST", "MNIST/raw"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw"),
}


def open_torchvision(kind: str, root: Path, split: str) -> ArraySource:
    import torchvision.datasets as D

    class_name, expected = TORCHVISION_KINDS[kind]
    try:
        ds = getattr(D, class_name)(str(root), train=(split == "train"), download=False)
    except RuntimeError:
        raise CachegenError(f"{class_name} files not found: expected them under {root / expected} "
                            "(nothing is downloaded; place the torchvision layout there)") from None
    images = np.asarray(ds.data, dtype=np.uint8)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return ArraySource(images, labels, tuple(ds.classes), kind=kind,
                       description=printable(f"{class_name} {split} {root}"))


def detect(root: Path) -> str | None:
    for kind, (_, expected) in TORCHVISION_KINDS.items():
        if (root / expected).is_dir():
            return kind
    return None
