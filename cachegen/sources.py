"""Sources: the built-in sample, an ImageFolder tree, torchvision's on-disk datasets, or a .npz."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cacheaug.transforms import to_pil
from cachegen.sample import SAMPLE_SEED, SAMPLE_SIZE, SAMPLE_TEST_SIZE, make_sample

# Without a 'classes' array, label k names class str(k): a larger label is surely a mistake.
MAX_UNNAMED_CLASSES = 1 << 20
# Image modes a folder image is grayscale in (loaded as L; any other as RGB, alpha dropped).
GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
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

    def pixels(self, index: int) -> np.ndarray | None:
        """The image as HWC uint8 without making a PIL image, where the source holds arrays (the
        same bytes as load's); None: use load."""
        return None

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

    def pixels(self, index: int) -> np.ndarray:
        image = self.images[index]
        return image[:, :, None] if image.ndim == 2 else image

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
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

        try:
            classes, _ = find_classes(root)
        except OSError as e:
            raise CachegenError(f"no images in {root}: expected one sub-folder of images per class ({e})") from None
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = _image_files(root / name, IMG_EXTENSIONS)
            if not found:
                raise CachegenError(f"no images in {root / name}: expected one sub-folder of images per class, "
                                    f"each holding {', '.join(IMG_EXTENSIONS)} files")
            paths += found
            labels += [label] * len(found)
        self.root = root
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(printable(c) for c in classes)
        self.kind, self.description = "folder", printable(f"ImageFolder {root}")

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() forever
            raise OSError(f"{path} is not a regular file")
        with warnings.catch_warnings():
            # Over Image.MAX_IMAGE_PIXELS: unreadable (a one-line error, or skipped), not decoded
            # after a warning; twice that is PIL's DecompressionBombError anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte, not clip at 255
                    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
                return image.convert("L" if image.mode in GRAY_MODES else "RGB")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.paths:
            try:
                st = os.stat(path)
                about = f"|{st.st_size}|{st.st_mtime_ns}\n"
            except OSError:  # a broken link: load() names it, or --on-error skip leaves it out
                about = "|unreadable\n"
            # fsencode: a name that is not UTF-8 hashes as its bytes (str.encode would raise).
            h.update(os.fsencode(os.path.relpath(path, self.root)) + about.encode())
        return h.hexdigest()


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become U+FFFD (os.fsdecode leaves surrogates,
    which a strict terminal cannot print and a UTF-8 JSON reader may refuse)."""
    return os.fsencode(name).decode("utf-8", "replace")


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """The images under one class folder, as ImageFolder lists them (links followed, same order),
    but a symlink loop is an error: os.walk(followlinks=True) would go round it until the path
    is too long, listing the same images again at every turn."""
    top = str(folder)
    above = {top: {os.path.realpath(top)}}  # each folder walked: the real folders from top down to it
    listed = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        chain = above.pop(dirpath)
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            real = os.path.realpath(sub)
            if real in chain:
                raise CachegenError(f"symlink loop in the source: {sub} leads back to {real}; remove the link")
            above[sub] = chain | {real}
        listed.append((dirpath, sorted(f for f in filenames if f.lower().endswith(extensions))))
    return [os.path.join(dirpath, f) for dirpath, files in sorted(listed) for f in files]


def _from_npz(path: Path) -> ArraySource:
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy under a .npz name
            raise CachegenError(f"{path} holds one array, not a .npz archive: a .npz source needs 'images' "
                                "(N,H,W[,C] uint8) and 'labels'")
        with data:  # closes the file, whatever is wrong inside
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
    if (images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4))
            or 0 in images.shape[1:3]):
        raise CachegenError(f"{path}: 'images' must be uint8 (N,H,W) or (N,H,W,C) with C in 1,3,4 and H,W > 0; "
                            f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise CachegenError(f"{path}: 'labels' must be {len(images)} integers, one per image; got {labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise CachegenError(f"{path} holds no images")
    if names is None and labels.max() >= MAX_UNNAMED_CLASSES:
        raise CachegenError(f"{path}: labels run up to {int(labels.max())}, so {int(labels.max()) + 1} classes; "
                            f"number them 0..K-1, or add a 'classes' array naming each")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CachegenError(f"{path}: labels must lie in 0..{num_classes - 1} (one per class name); "
                            f"found {labels.min()}..{labels.max()}")
    classes = tuple(names) if names is not None else tuple(str(i) for i in range(num_classes))
    return ArraySource(images, labels.astype(np.int64), classes, kind="npz", description=printable(f"npz {path}"))


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
    return ArraySource(images, labels, tuple(ds.classes), kind=kind,
                       description=printable(f"{class_name} {split} {root}"))


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


__all__ = ["ArraySource", "FolderSource", "Source", "open_source", "printable"]
