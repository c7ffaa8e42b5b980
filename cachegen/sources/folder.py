"""An ImageFolder tree: one sub-folder per class, images decoded lazily in the workers."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cachegen.errors import CachegenError
from cachegen.sources.base import Source, printable

# Image modes a folder image is grayscale in (loaded as L; any other as RGB, alpha dropped).
GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
# Image modes a mask is read in: one channel of class indices (P: a palette's indices, as VOC stores them).
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")


class FolderSource(Source):
    """An ImageFolder tree: one sub-folder per class; images are decoded lazily, in the workers.

    With `masks` (a folder of PNG class-index masks, `mask_classes` naming their values): every
    image under `root`, in any sub-folders (one class, named after `root`: no class folders
    needed), each with its mask at the same relative path and stem under `masks`, `.png`."""

    def __init__(self, root: Path, *, masks: Path | None = None, mask_classes: tuple[str, ...] | None = None) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

        self.masks = masks
        if masks is not None:
            self._with_masks(root, masks, mask_classes, IMG_EXTENSIONS)
            return
        try:
            classes, _ = find_classes(root)
        except OSError as e:
            raise CachegenError(f"no images in {root}: expected one sub-folder of images per class ({e})") from None
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = image_files(root / name, IMG_EXTENSIONS)
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

    def _with_masks(self, root: Path, masks: Path, mask_classes: tuple[str, ...] | None,
                    extensions: tuple[str, ...]) -> None:
        if not masks.is_dir():
            raise CachegenError(f"--masks {masks} is not a folder: give the folder of PNG masks, one per image at "
                                "the same relative path and stem")
        if not mask_classes:
            raise CachegenError("--masks needs --mask-classes: the number of mask classes (21), or their names "
                                "(background,road,car), so a value outside them is found")
        paths = image_files(root, extensions)
        if not paths:
            raise CachegenError(f"no images in {root}: expected {', '.join(extensions)} files (in any sub-folders)")
        self.root, self.paths = root, paths
        self.labels = np.zeros(len(paths), dtype=np.int64)
        self.classes = (printable(root.resolve().name or str(root)),)
        self.mask_classes = tuple(mask_classes)
        self.kind, self.description = "folder", printable(f"folder {root} with masks {masks}")

    def name(self, index: int) -> str:
        return self.paths[index]

    def mask_name(self, index: int) -> str:
        return str(self._mask_path(index))

    def _mask_path(self, index: int) -> Path:
        relative = Path(os.path.relpath(self.paths[index], self.root))
        return self.masks / relative.with_suffix(".png")

    def load(self, index: int) -> Image.Image:
        with _opened(self.paths[index]) as image:
            if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte, not clip at 255
                return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
            return image.convert("L" if image.mode in GRAY_MODES else "RGB")

    def load_mask(self, index: int) -> np.ndarray:
        if self.masks is None:
            return super().load_mask(index)
        path = self._mask_path(index)
        if not path.exists():
            raise FileNotFoundError(f"no mask {path} for image {self.paths[index]}")
        with _opened(str(path)) as mask:
            if mask.mode not in MASK_MODES:
                raise ValueError(f"mask {path} is a {mask.mode} image: a mask is a single-channel PNG of class "
                                 "indices (mode L, P or I;16)")
            return np.asarray(mask)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.paths + ([str(self._mask_path(i)) for i in range(len(self.paths))] if self.masks else []):
            try:
                st = os.stat(path)
                about = f"|{st.st_size}|{st.st_mtime_ns}\n"
            except OSError:  # a broken link: load() names it, or --on-error skip leaves it out
                about = "|unreadable\n"
            # fsencode: a name that is not UTF-8 hashes as its bytes (str.encode would raise).
            h.update(os.fsencode(os.path.relpath(path, self.root)) + about.encode())
        return h.hexdigest()


def _opened(path: str):
    """PIL's Image.open of a regular file (a FIFO would block open() forever); over
    Image.MAX_IMAGE_PIXELS unreadable (a one-line error, or skipped), not decoded after a warning
    (twice that is PIL's DecompressionBombError anyway)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{path} is not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def image_files(folder: Path, extensions: tuple[str, ...]) -> list[str]:
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
