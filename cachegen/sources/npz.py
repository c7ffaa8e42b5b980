"""A .npz of 'images' (N,H,W[,C] uint8), 'labels' and optional 'classes' (and, for segmentation,
'masks' (N,H,W) class indices with optional 'mask_classes'), read without pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cacheformat.mask import MAX_CLASSES as MAX_MASK_CLASSES
from cachegen.errors import CachegenError
from cachegen.sources.array import ArraySource
from cachegen.sources.base import printable

# Without a 'classes' array, label k names class str(k): a larger label is surely a mistake.
MAX_UNNAMED_CLASSES = 1 << 20


def open_npz(path: Path) -> ArraySource:
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
            masks = data["masks"] if "masks" in data.files else None
            mask_names = [str(c) for c in data["mask_classes"]] if "mask_classes" in data.files else None
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
    mask_classes = _mask_classes(path, images, masks, mask_names) if masks is not None else None
    return ArraySource(images, labels.astype(np.int64), classes, kind="npz", description=printable(f"npz {path}"),
                       masks=masks, mask_classes=mask_classes)


def _mask_classes(path: Path, images: np.ndarray, masks: np.ndarray, names: list[str] | None) -> tuple[str, ...]:
    """The mask classes of a .npz with 'masks' (N, H, W) class indices beside its images: named by
    'mask_classes', or 0..max where it has none. A mask whose values leave them is found per
    sample, by the builder (one line naming it, or skipped under --on-error skip)."""
    if masks.shape != images.shape[:3] or not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == bool):
        raise CachegenError(f"{path}: 'masks' must be integers (N,H,W), one class-index mask per image, "
                            f"{images.shape[:3]}; got {masks.dtype} {masks.shape}")
    if names is not None:
        if not 1 <= len(names) <= MAX_MASK_CLASSES:
            raise CachegenError(f"{path}: 'mask_classes' names {len(names)} classes; a mask holds 1 to {MAX_MASK_CLASSES}")
        return tuple(names)
    top = int(masks.max()) if masks.size else 0
    if top >= MAX_MASK_CLASSES:
        raise CachegenError(f"{path}: mask values run up to {top}; a mask holds at most {MAX_MASK_CLASSES} classes, "
                            "numbered 0..K-1")
    return tuple(str(k) for k in range(top + 1))
