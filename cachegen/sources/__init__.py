"""Sources: one file per kind behind the one `Source` interface (base.py); open_source picks the kind
from the spec. The built-in sample (sample.py), an ImageFolder tree (folder.py), torchvision's on-disk
datasets (torchvision.py), a .npz (npz.py); array.py holds the in-memory images three of them share."""

from __future__ import annotations

from pathlib import Path

from cachegen.errors import CachegenError
from cachegen.sources.array import ArraySource
from cachegen.sources.base import Source, printable
from cachegen.sources.folder import FolderSource
from cachegen.sources.npz import open_npz
from cachegen.sources.sample import open_sample
from cachegen.sources.torchvision import TORCHVISION_KINDS, detect, open_torchvision


def open_source(spec: str | None, *, split: str = "train", masks: str | bool | None = None,
                mask_classes: tuple[str, ...] | None = None) -> Source:
    """Open a source from its spec: None/'sample', 'cifar10:ROOT' (and cifar100, mnist,
    fashionmnist), a .npz file, or a folder (torchvision layout detected, else ImageFolder).

    `masks`: True for the sample with its shapes' masks; a folder of PNG masks for a folder of
    images (`mask_classes` naming their values). A .npz has masks where it holds a 'masks' array."""
    if spec in (None, "", "sample"):
        if masks not in (None, True, False):
            raise CachegenError("--masks DIR is for a folder of images: the sample's masks are --sample-masks")
        return open_sample(split, masks=bool(masks))
    if masks is True:
        raise CachegenError(f"--sample-masks is for the built-in sample, not {spec}: a folder's masks are --masks DIR, "
                            "a .npz's its 'masks' array")
    if masks is not None and not (Path(spec).is_dir() and not detect(Path(spec))):
        raise CachegenError(f"--masks DIR is for a folder of images, not {spec} (a .npz holds its own 'masks' array)")
    if masks is not None:
        return FolderSource(Path(spec), masks=Path(masks), mask_classes=mask_classes)
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in TORCHVISION_KINDS:
        return open_torchvision(kind.lower(), Path(rest), split)
    path = Path(spec)
    if not path.exists():
        raise CachegenError(f"source {spec} does not exist: give a folder, a .npz, "
                            f"'{{cifar10,cifar100,mnist,fashionmnist}}:ROOT' or 'sample'")
    if path.is_file():
        if path.suffix != ".npz":
            raise CachegenError(f"source {spec} is a file but not a .npz: give a folder or a .npz")
        return open_npz(path)
    detected = detect(path)
    if detected:
        return open_torchvision(detected, path, split)
    return FolderSource(path)


__all__ = ["ArraySource", "FolderSource", "Source", "open_source", "printable"]
