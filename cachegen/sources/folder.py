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
