"""The build settings every worker needs, and the augmenter that loads source samples and augments
them with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from cachegen import faults
from cachegen.errors import CachegenError
from cacheformat import FormatError
from cacheformat.mask import MaskSpec
from cachegen.sources import Source
from cachegen.teacher import Teacher
from cacheaug.batched import make_batched, place
from cacheaug.transforms import augment, augment_pair, make_transform, to_hwc_uint8
from cacheformat.mask import check_values


@dataclass(frozen=True)
class BuildSettings:
    """What every worker needs to write any shard of this build."""

    source: Source
    root: Path
    spec: str
    epochs: int
    size: int
    schedule: str
    seed: int
    encoding: str
    on_error: str
    quality: int | None = None  # a jpg payload's JPEG quality; None: cachegen.shards.JPEG_QUALITY
    resize: int | None = None
    channels: int | None = None  # every source image converted to 1 (L) or 3 (RGB); None: as loaded
    shape: tuple[int, int, int] | None = None  # every output image's HWC shape
    source_shape: tuple[int, int, int] | None = None  # the (resized) source's, where fixed
    augment_on: str = "cpu"  # "device": a cached epoch's shard is augmented in batches (cacheaug.batched)
    device: str | None = None  # a device build's augmentation runs here, on this device; None: in the workers
    teacher: Teacher | None = None  # a reinforced cache's teacher: runs where the augmentation does
    mask: MaskSpec | None = None  # a segmentation build's stored masks (the source's, augmented with their images)


class Augmenter:
    """Loads source samples (with the optional deterministic resize and the build's channel count) and
    augments them, seeded per sample."""

    def __init__(self, settings: BuildSettings) -> None:
        self.settings = settings
        self.transforms: dict[int, object] = {}
        self.resize = T.Compose([T.Resize(settings.resize), T.CenterCrop(settings.resize)]) if settings.resize else None

    def load(self, index: int) -> Image.Image | None:
        """The source image, resized where asked, with the build's channels; None where unreadable and
        --on-error skip."""
        image = self._read(index)
        return None if image is None else self._prepared(image)

    def _read(self, index: int) -> Image.Image | None:
        settings = self.settings
        try:
            faults.before_read(settings.source, index)
            return settings.source.load(index)
        except Exception as e:
            if settings.on_error == "skip":
                return None
            raise CachegenError(f"cannot read {settings.source.name(index)} ({type(e).__name__}: {e}); "
                                "fix or remove it, or pass --on-error skip") from None

    def _prepared(self, image: Image.Image) -> Image.Image:
        return self.to_channels(self.resize(image) if self.resize else image)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        """The source image (as load gives it) and its mask (H, W), resized with it where asked
        (nearest-neighbour); None where either is unreadable, of another size than its image, or
        holds a value outside the mask classes, and --on-error skip."""
        image = self._read(index)
        if image is None:
            return None
        source = self.settings.source
        try:
            mask = np.asarray(source.load_mask(index))
            if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
                raise ValueError(f"a {mask.dtype} array of shape {mask.shape}, not (H, W) class indices")
            if mask.shape != image.size[::-1]:
                raise ValueError(f"{mask.shape[1]}x{mask.shape[0]}, its image {image.size[0]}x{image.size[1]}")
            check_values(mask, len(source.mask_classes), "values")
        except Exception as e:
            if self.settings.on_error == "skip":
                return None
            what = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise CachegenError(f"bad mask {source.mask_name(index)} ({what}); fix or remove it, or pass "
                                "--on-error skip") from None
        return self._prepared(image), (self._resize_mask(mask) if self.resize else mask)

    def _resize_mask(self, mask: np.ndarray) -> np.ndarray:
        """The mask through --resize's Resize+CenterCrop, nearest-neighbour (v2 resamples a Mask so)."""
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        resize = v2.Compose([v2.Resize(self.settings.resize), v2.CenterCrop(self.settings.resize)])
        return resize(tv_tensors.Mask(torch.from_numpy(mask.astype(np.int64)))).numpy()

    def pixels(self, index: int) -> np.ndarray | None:
        """What load gives, as HWC uint8: straight from a source that holds arrays where nothing is
        resized or converted (no PIL image made and read back), else through load."""
        settings = self.settings
        if settings.resize is None:
            array = settings.source.pixels(index)
            if array is not None and (settings.channels is None or array.shape[2] == settings.channels):
                return array
        image = self.load(index)
        return None if image is None else to_hwc_uint8(image)

    def to_channels(self, image: Image.Image) -> Image.Image:
        channels = self.settings.channels
        if channels is None or len(image.getbands()) == channels:
            return image
        return image.convert("L" if channels == 1 else "RGB")

    def augment(self, epoch: int, index: int, image: Image.Image) -> np.ndarray:
        settings = self.settings
        try:
            out = augment(self._transform(epoch), image, seed=settings.seed, epoch=epoch, index=index)
        except FormatError:  # ours, already one line (a TransformError: the output is not an image)
            raise
        except Exception as e:
            raise CachegenError(f"transform failed on {settings.source.name(index)}: {type(e).__name__}: {e}") from None
        if settings.shape is not None and out.shape != settings.shape:
            raise CachegenError(f"transform output shape varies: {settings.source.name(index)} gave {out.shape}, "
                                f"the first sample gave {settings.shape}; every image of a cache needs one shape "
                                "(end the transform with a Resize/CenterCrop)")
        return out

    def augment_pair(self, epoch: int, index: int, image: Image.Image, mask: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The sample and its mask augmented together (cacheaug.transforms.augment_pair): the image
        HWC uint8, the mask as its stored member (cacheformat.mask)."""
        settings = self.settings
        transform = self._transform(epoch)
        try:
            out, out_mask = augment_pair(transform, image, mask, seed=settings.seed, epoch=epoch, index=index)
        except FormatError:
            raise
        except Exception as e:
            raise CachegenError(f"transform failed on {settings.source.name(index)} and its mask (called as "
                                f"transform(image, mask), as torchvision.transforms.v2 takes them): "
                                f"{type(e).__name__}: {e}") from None
        if settings.shape is not None and out.shape != settings.shape:
            raise CachegenError(f"transform output shape varies: {settings.source.name(index)} gave {out.shape}, "
                                f"the first sample gave {settings.shape}; every image of a cache needs one shape "
                                "(end the transform with a Resize/CenterCrop)")
        if out_mask.shape != out.shape[:2]:
            raise CachegenError(f"the transform gave {settings.source.name(index)} a {out_mask.shape} mask for a "
                                f"{out.shape[:2]} image: a transform must move the mask with the image")
        try:
            check_values(out_mask, len(settings.source.mask_classes), f"the mask of {settings.source.name(index)}, "
                                                                       "augmented,")
        except ValueError as e:
            raise CachegenError(f"{e}: the transform fills masks with a value that is not a class") from None
        return out, (settings.mask.encode(out_mask) if settings.mask is not None else b"")

    def _transform(self, epoch: int):
        settings = self.settings
        if epoch not in self.transforms:
            self.transforms[epoch] = make_transform(settings.spec, epoch=epoch, epochs=settings.epochs,
                                                    size=settings.size, schedule=settings.schedule)
        return self.transforms[epoch]

    def batched(self, epoch: int, device: torch.device = torch.device("cpu")):
        """The batched augmentation of `epoch` (cacheaug.batched) on `device`, made once per epoch."""
        settings = self.settings
        key = ("batched", epoch)
        if key not in self.transforms:
            # Placed as the live loader places it (cacheaug.batched.place): buffers on `device`,
            # Kornia's draws on the CPU.
            self.transforms[key] = place(make_batched(settings.spec, epoch=epoch, epochs=settings.epochs,
                                                      size=settings.size, channels=settings.source_shape[2],
                                                      schedule=settings.schedule), device)
        return self.transforms[key]

    def source_pixels(self, index: int, pixels: np.ndarray) -> np.ndarray:
        """The un-augmented image (self.pixels) as a live cache stores it: HWC uint8 of one fixed shape."""
        if pixels.shape != self.settings.source_shape:
            raise MixedShapes(f"a live cache stores the source un-augmented, so its images need one shape: "
                                f"{self.settings.source.name(index)} is {pixels.shape}, the first is "
                                f"{self.settings.source_shape}; pass --resize N")
        return pixels


class MixedShapes(CachegenError):
    """A live build's source images are not all of one shape (and no --resize makes them so)."""


def check_one_shape(settings: BuildSettings, images: list[tuple[int, np.ndarray]]) -> None:
    """CachegenError unless every (index, HWC image) has the first one's shape."""
    first = images[0][1].shape
    for index, pixels in images:
        if pixels.shape != first:
            raise CachegenError(f"--augment-on device augments whole batches, so the source images need one shape: "
                                f"{settings.source.name(index)} is {pixels.shape}, another {first}; pass --resize N")
