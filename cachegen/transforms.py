"""Augmentation presets, user factories and the per-sample seeding rule (public API).

`make_transform`, `augment` and `to_pil` are the randomness contract of a cache: the builder
and the live reader both call them, so a sample augmented live is the sample a cache stores.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from cachegen.errors import CachegenError

PRESETS = ("cifar", "imagenet", "mnist", "val", "none")
DETERMINISTIC = ("val", "none")  # presets written as one epoch
SCHEDULES = ("constant", "linear")
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed for sample `index` of epoch `epoch`: a SplitMix64 hash, cheap and well mixed."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # torch seeds must fit in a signed 64-bit int


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed torch's global generator for one sample (~1 µs, unlike torch.manual_seed's ~100 µs)."""
    torch.default_generator.manual_seed(sample_seed(seed, epoch, index))


def to_hwc_uint8(image) -> np.ndarray:
    """A transform's output (PIL image, uint8 or float CHW tensor, HWC array) as HWC uint8."""
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise CachegenError(f"transform returned a {image.dtype} tensor of shape {tuple(image.shape)}: "
                                "return a PIL image or a CHW uint8/float tensor")
        return image.permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise CachegenError(f"transform returned {array.dtype} {array.shape}: return a PIL image or a tensor")
    return array


def to_pil(pixels: np.ndarray) -> Image.Image:
    """A stored HWC uint8 image as the PIL image a transform starts from (one channel: mode L)."""
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def augment(transform: Callable, image: Image.Image, *, seed: int, epoch: int, index: int) -> np.ndarray:
    """Sample `index` of epoch `epoch`, augmented: seeded, transformed, as HWC uint8."""
    seed_sample(seed, epoch, index)
    return to_hwc_uint8(transform(image))


def strength(epoch: int, epochs: int, schedule: str) -> float:
    """Augmentation strength for `epoch`: 1.0 throughout, or 1.0 falling linearly to 0.5 at the end."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    return 1.0 - 0.5 * epoch / (epochs - 1)


class Identity:
    """The `none` preset: every image as the source holds it (its own size; nothing random)."""

    def __call__(self, image):
        return image

    def __repr__(self) -> str:
        return "Identity()"


def _preset(name: str, epoch: int, epochs: int, size: int, schedule: str) -> Callable:
    s = strength(epoch, epochs, schedule)
    if name == "cifar":
        jitter = 0.2 * s
        return T.Compose([
            T.RandomCrop(size, padding=max(1, round(size / 8 * s))),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ])
    if name == "imagenet":
        return T.Compose([
            T.RandomResizedCrop(size, scale=(1.0 - 0.92 * s, 1.0)),
            T.RandomHorizontalFlip(),
        ])
    if name == "mnist":
        return T.RandomAffine(degrees=10 * s, translate=(0.1 * s, 0.1 * s))
    if name == "val":
        return T.Compose([T.Resize(size), T.CenterCrop(size)])
    if name == "none":
        return Identity()
    raise CachegenError(f"unknown transform preset {name!r}: use one of {', '.join(PRESETS)} or module:factory")


def load_factory(spec: str) -> Callable[[int, int], Any]:
    """Import a user's `module:factory` (called as factory(epoch, epochs) -> transform)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CachegenError(f"bad transform {spec!r}: expected a preset ({', '.join(PRESETS)}) or module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError or anything the module raises on import
        raise CachegenError(f"cannot import module {module_name!r} for --transform {spec}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CachegenError(f"module {module_name!r} has no callable {attr!r} (from --transform {spec})")
    return factory


def is_random(spec: str) -> bool:
    """Whether a transform spec augments (False only for the deterministic `val` and `none` presets)."""
    return spec not in DETERMINISTIC


def make_transform(spec: str, *, epoch: int, epochs: int, size: int, schedule: str = "constant") -> Callable:
    """The transform for `epoch` of `epochs`: a preset name or a user's `module:factory`."""
    if schedule not in SCHEDULES:
        raise CachegenError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if ":" in spec:
        try:
            transform = load_factory(spec)(epoch, epochs)
        except CachegenError:
            raise
        except Exception as e:
            raise CachegenError(f"transform factory {spec} failed for epoch {epoch}: {e}") from None
        if not callable(transform):
            raise CachegenError(f"transform factory {spec} returned {type(transform).__name__}, not a transform")
        return transform
    return _preset(spec, epoch, epochs, size, schedule)


def fingerprint(spec: str, *, size: int, schedule: str) -> str:
    """A hash naming the transform: its spec, output size and schedule."""
    return hashlib.sha256(f"{spec}|{schedule}|{size}".encode()).hexdigest()


def epoch_fingerprint(transform: Callable) -> str:
    """A hash of what one epoch's transform does, from its repr (parameters included).

    Stored per epoch, so growing a cache can check that the epochs already built would still be
    built the same way (a linear schedule or a user factory may depend on the epoch count).
    """
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))  # object addresses change per run
    return hashlib.sha256(text.encode()).hexdigest()
