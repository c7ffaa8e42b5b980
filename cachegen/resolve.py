"""Turn a BuildConfig into the build settings and the manifest's metadata: probe the source, resolve
the transform, size, channels and mode, load the teacher."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from cachegen.augmenter import BuildSettings, Augmenter, check_one_shape
from cachegen.config import BuildConfig
from cachegen.errors import CachegenError
from cachegen.shards import encode
from cachegen.sources import Source, printable
from cachegen.teacher import Teacher, probe_teacher
from cacheaug.batched import augment_batch, batch_seed, make_batched
from cacheaug.transforms import to_hwc_uint8


PROBES = 8  # source images probed for the channel count and --mode auto's size estimate

TAR_BYTES_PER_SAMPLE = 1536  # two 512-byte headers and the padded label


def _resolve_spec(spec: str, source: Source, side: int) -> str:
    """`auto`: the mnist preset for (Fashion-)MNIST, cifar for images of at most 64 px, else imagenet."""
    if spec != "auto":
        return spec
    if source.kind in ("mnist", "fashionmnist"):
        return "mnist"
    return "cifar" if side <= 64 else "imagenet"


def _probe_images(settings: BuildSettings) -> list[tuple[int, Image.Image]]:
    """Up to PROBES readable source images as (index, image after any --resize, channels as loaded):
    the first readable one, then others spread over the source."""
    n = len(settings.source)
    augment = Augmenter(replace(settings, on_error="skip", channels=None))
    found = []
    for index in range(min(n, 64)):
        image = augment.load(index)
        if image is not None:
            found.append((index, image))
            break
    if not found:
        if settings.on_error == "fail":
            Augmenter(settings).load(0)  # raises the error that names the file
        raise CachegenError(f"none of the first {min(n, 64)} samples could be read: check the source")
    for index in dict.fromkeys(np.linspace(0, n - 1, PROBES).round().astype(int).tolist()):
        if len(found) < PROBES and index != found[0][0] and (image := augment.load(index)) is not None:
            found.append((index, image))
    return found


def _probe(settings: BuildSettings, probes: list[tuple[int, Image.Image]]) -> tuple[tuple, tuple, float]:
    """Augment the probe images (epoch 0): (output shape, source shape, mean encoded bytes per image)."""
    augment = Augmenter(settings)
    index, image = probes[0]
    first = augment.augment(0, index, augment.to_channels(image))
    augment = Augmenter(replace(settings, shape=first.shape))  # the others must match it
    outputs = [first] + [augment.augment(0, i, augment.to_channels(im)) for i, im in probes[1:]]
    if settings.encoding in ("png", "jpg") and first.shape[2] not in (1, 3):
        raise CachegenError(f"--format {settings.encoding} stores 1 or 3 channels, these images have {first.shape[2]}"
                            f"{' (RGBA)' if first.shape[2] == 4 else ''}: pass --channels 3 (or 1), or --format npy")
    encoded = np.mean([len(encode(out, settings.encoding)) for out in outputs])
    return first.shape, to_hwc_uint8(augment.to_channels(image)).shape, float(encoded)


def _probe_batched(settings: BuildSettings, probes: list[tuple[int, Image.Image]]) -> tuple[tuple, tuple]:
    """Augment the probe images as one batch with the batched augmentation (epoch 0): (output
    shape, source shape), both HWC."""
    augmenter = Augmenter(settings)
    pixels = [to_hwc_uint8(augmenter.to_channels(image)) for _, image in probes]
    check_one_shape(settings, [(index, p) for (index, _), p in zip(probes, pixels)])
    channels = pixels[0].shape[2]
    batched = make_batched(settings.spec, epoch=0, epochs=settings.epochs, size=settings.size, channels=channels,
                           schedule=settings.schedule)
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    out = augment_batch(batched, batch, seed=batch_seed(settings.seed, 0, 0), name=settings.spec)
    if out.shape[1] != channels:
        raise CachegenError(f"transform {settings.spec} turns {channels}-channel batches into {out.shape[1]} channels: "
                            "the batched augmentation must keep the channels (mean/std are per source channel)")
    return (out.shape[2], out.shape[3], out.shape[1]), pixels[0].shape


def _teacher(config: BuildConfig, mode: str, shape: tuple, classes: int, encoding: str,
             device: str | None) -> Teacher | None:
    """--teacher loaded and probed on a blank batch (where it will run: `device`, else the CPU), or None."""
    if config.teacher is None:
        return None
    if mode == "live":  # --mode auto chose it
        raise CachegenError("--mode auto chose a live cache (a cached one would exceed --max-cache-gb), augmented as "
                            "it is read, so --teacher would run at read time: pass --mode cached, or drop --teacher")
    return probe_teacher(config.teacher, config.teacher_topk, classes, shape, encoding,
                         torch.device(device) if device else torch.device("cpu"))


def _choose_mode(config: BuildConfig, settings: BuildSettings, n: int, epochs: int, probe_bytes: int) -> str:
    if config.mode != "auto":
        return config.mode
    estimate = (probe_bytes + TAR_BYTES_PER_SAMPLE) * n * epochs
    if estimate <= config.max_cache_gb * 1e9:
        return "cached"
    if not config.quiet:
        print(f"cachegen: {epochs} epochs would take ~{estimate / 1e9:.3g} GB, over --max-cache-gb "
              f"{config.max_cache_gb:g}: writing a live cache (the source once; augmentation at read time)")
    return "live"


def _warn_relative_factory(spec: str) -> None:
    """A live cache imports its factory wherever it is read: a relative path works only from here."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") and not os.path.isabs(where):
        absolute = f"{os.path.abspath(where)}:{attr}"
        print(f"cachegen: warning: this live cache names its transform by a relative path ({spec}), which a "
              f"reader resolves from its own current folder: read it from {printable(os.getcwd())}, or build with "
              f"--transform {printable(absolute)} to read it from anywhere", file=sys.stderr)
