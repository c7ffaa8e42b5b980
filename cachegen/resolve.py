"""Turn a BuildConfig into the build settings and the manifest's metadata: probe the source, resolve
the transform, size, channels and mode, load the teacher."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from cachegen import __version__
from cachegen.augmenter import Augmenter, BuildSettings, check_one_shape
from cacheformat.mask import MaskSpec, mask_dtype
from cachegen.config import BuildConfig, check_mask_options, parse_device, parse_shard_size
from cachegen.errors import CachegenError
from cacheformat.manifest import scale_problem
from cachegen.manifest import FORMAT, FORMAT_VERSION
from cachegen.outdir import built_epochs
from cachegen.shards import JPEG_QUALITY, encode, npy_header_bytes
from cachegen.sources import Source, open_source, printable
from cachegen.sources.factory import FactorySource
from cachegen.sources.torchvision import TORCHVISION_KINDS
from cachegen.stats import stats_of_cache
from cachegen.teacher import Teacher, manifest_block, probe_teacher
from cacheaug.batched import augment_batch, batch_seed, make_batched
from cacheaug.transforms import (epoch_fingerprint, factory_sha256, fingerprint, is_random, library_versions,
                                 make_transform, to_hwc_uint8)


# The kinds of source that have splits (--split picks one); any other refuses --split test rather
# than build the training images under a test cache's name.
TWO_SPLIT_KINDS = frozenset({"sample", *TORCHVISION_KINDS})  # train or test
SPLIT_KINDS = frozenset({"hf", *TWO_SPLIT_KINDS})
PROBES = 8  # source images probed for the channel count and --mode auto's size estimate
TAR_BYTES_PER_SAMPLE = 1536  # two 512-byte headers and the padded label


@dataclass(frozen=True)
class ResolvedBuild:
    """A BuildConfig resolved against its source: what this build writes."""

    settings: BuildSettings  # what every worker needs; root: --out
    meta: dict  # the manifest's metadata, its identity among it: written first, as the build's state
    mode: str  # "cached" or "live" (what --mode auto chose)
    per_shard: int  # samples a shard
    kept_all: bool  # --out holds more epochs than asked: all kept, and said once the folder is known to hold this cache
    borrowed: tuple[list[float], list[float]] | None  # --stats-from's mean and std
    estimate: float = 0.0  # bytes the whole cache will take, from the probed images (the free-space check)


def resolve(config: BuildConfig) -> ResolvedBuild:
    """Open and probe the source, then settle the transform, epochs, shapes, mode, device and teacher;
    nothing is written yet, so a config the source refuses leaves --out as it was."""
    source = FactorySource(config.source_factory, quiet=config.quiet) if config.source_factory else \
        open_source(config.source, split=config.split, image_column=config.image_column,
                    label_column=config.label_column, quiet=config.quiet,
                    masks=config.masks if config.masks is not None else (True if config.sample_masks else None),
                    mask_classes=config.mask_class_names())
    if config.split not in ("train", "test") and source.kind in TWO_SPLIT_KINDS:
        raise CachegenError(f"--split {config.split}: {source.description} has the splits train or test only")
    if config.split != "train" and source.kind not in SPLIT_KINDS:
        raise CachegenError(f"--split {config.split} picks a split of a torchvision dataset, the sample or a Hugging "
                            f"Face dataset; {source.description} has none: build the {config.split} images from a "
                            f"{source.kind} of their own, without --split")
    if source.mask_classes is not None:
        check_mask_options(config)  # a .npz's masks are known once it is open
    settings = BuildSettings(source=source, root=config.out, spec=config.transform, epochs=config.epochs, size=0,
                             schedule=config.schedule, seed=config.seed, encoding=config.encoding,
                             on_error=config.on_error, resize=config.resize, quality=config.quality)
    probes = _probe_images(settings)
    settings, kept_all = _transform(config, settings, probes)
    augment_on = config.augment_on
    if augment_on == "auto" and (":" in settings.spec or source.mask_classes is not None):
        augment_on = "cpu"  # a factory's transform, or masks: per sample unless the user says
    settings, probe_bytes = _shapes(config, settings, probes, augment_on)
    # --stats-from is read here: a cache it cannot lend its statistics refuses the build before any work
    borrowed = stats_of_cache(config.stats_from, settings.shape[2]) if config.stats_from else None
    mode = _choose_mode(config, settings, len(source), settings.epochs, probe_bytes)
    settings = _for_mode(config, settings, mode, augment_on)
    _check_channels(settings.encoding, _stored_shape(settings, mode)[2])  # a live cache stores the source
    if source.mask_classes is not None:  # stored as the images are: augmented (cached), or the source's (live)
        settings = replace(settings, mask=MaskSpec(shape=tuple(_stored_shape(settings, mode)[:2]),
                                                   classes=source.mask_classes,
                                                   dtype=mask_dtype(len(source.mask_classes))))
    count, nbytes = parse_shard_size(config.shard_size)
    per_shard = count or max(1, nbytes // int(np.prod(_stored_shape(settings, mode))))
    meta = _meta(config, settings, mode, per_shard)
    problem = scale_problem(meta)  # what the readers would refuse, refused before anything is written
    if problem:
        raise CachegenError(f"{problem}: pass a smaller --size or --resize (or --resize to store larger images)")
    passes = settings.epochs if mode == "cached" else 1  # a live cache stores the source once
    estimate = (probe_bytes + TAR_BYTES_PER_SAMPLE) * len(source) * passes
    return ResolvedBuild(settings, meta, mode, per_shard, kept_all, borrowed, estimate)


def source_options(config: BuildConfig) -> dict:
    """The options that say how to open the source, beyond its spec and split: those given only (a
    manifest records them beside the spec, so that the source can be opened again)."""
    given = {"image_column": config.image_column, "label_column": config.label_column,
             "source_factory": config.source_factory}  # code: recorded, never run by what reads the cache
    return {k: v for k, v in given.items() if v is not None}


def _transform(config: BuildConfig, settings: BuildSettings,
               probes: list[tuple[int, Image.Image]]) -> tuple[BuildSettings, bool]:
    """The settings with the transform, its output size, the channels and the epochs (at least as
    many as --out holds); whether --out holds more epochs than asked."""
    source = settings.source
    side = min(probes[0][1].size)  # the first image's shorter side, after any --resize
    channels = config.channels or max(len(image.getbands()) for _, image in probes)
    size = config.size or config.resize or source.image_size or side
    spec = _resolve_spec(config.transform, source, side)
    if spec == "cifar" and size > side:
        raise CachegenError(f"the cifar preset crops, and --size {size} is larger than the images "
                            f"({'x'.join(map(str, probes[0][1].size))}): pass a smaller --size, --resize {size}, "
                            "or --transform imagenet")
    epochs = config.epochs if is_random(spec) else 1
    if epochs != config.epochs and not config.quiet:
        print(f"cachegen: transform {spec} is deterministic: writing 1 epoch, not {config.epochs}")
    built = built_epochs(config.out) if not config.overwrite else 0
    return replace(settings, spec=spec, epochs=max(epochs, built), size=size, channels=channels), built > epochs


def _shapes(config: BuildConfig, settings: BuildSettings, probes: list[tuple[int, Image.Image]],
            augment_on: str) -> tuple[BuildSettings, float]:
    """The settings with the output and source shapes, from the probe images augmented as this build
    will augment them; the bytes an image takes (--mode auto's estimate)."""
    if augment_on == "device" and settings.source.mask_classes is None:  # the batched augmentation gives the output shape
        shape, source_shape = _probe_batched(settings, probes)
        probe_bytes = float(np.prod(shape))  # raw pixels: --mode auto's estimate
    else:
        shape, source_shape, probe_bytes = _probe(settings, probes)
    return replace(settings, shape=shape, source_shape=source_shape), probe_bytes


def _for_mode(config: BuildConfig, settings: BuildSettings, mode: str, augment_on: str) -> BuildSettings:
    """The settings with what the mode decides: the encoding, where the augmentation runs, the teacher."""
    if mode == "live":
        _warn_relative_factory(settings.spec)
    encoding = config.encoding  # a live cache stores its source in it too
    if config.device and mode == "live":  # --mode auto chose live
        raise CachegenError(f"--mode auto chose a live cache (a cached one would exceed --max-cache-gb), augmented "
                            f"as it is read, on the loader's device: drop --device {config.device}, or pass --mode "
                            "cached")
    # A cached device build augments in this process on the GPU where there is one, else in the workers.
    device = (str(parse_device(config.device)) if config.device else "cuda" if torch.cuda.is_available() else None) \
        if mode == "cached" and augment_on == "device" else None
    return replace(settings, encoding=encoding, augment_on=augment_on, device=device,
                   teacher=_teacher(config, mode, settings.shape, len(settings.source.classes), encoding, device))


def _stored_shape(settings: BuildSettings, mode: str) -> tuple[int, int, int]:
    """The shape of a stored image: a live cache stores the source, a cached one the output."""
    return settings.source_shape if mode == "live" else settings.shape


def _meta(config: BuildConfig, settings: BuildSettings, mode: str, per_shard: int) -> dict:
    """The manifest's metadata: what was built from what, how, with which versions."""
    source, spec, size, epochs, device = settings.source, settings.spec, settings.size, settings.epochs, settings.device
    stored_shape, encoding, augment_on = _stored_shape(settings, mode), settings.encoding, settings.augment_on
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mode": mode,
        "created_by": f"cachegen {__version__}",
        "source": {"kind": source.kind, "description": source.description,
                   "fingerprint": source.fingerprint(), "num_samples": len(source)},
        "transform": {"spec": spec, "schedule": config.schedule, "size": size, "resize": config.resize,
                      "fingerprint": fingerprint(spec, size=size, schedule=config.schedule),
                      "factory_sha256": factory_sha256(spec),
                      **({"augment_on": augment_on} if mode == "live" or augment_on == "device" else {}),
                      **({"augment_device": torch.device(device).type if device else "cpu"}
                         if mode == "cached" and augment_on == "device" else {})},
        "versions": library_versions(),  # a sample's bytes depend on them too
        "seed": config.seed,
        "image": {"encoding": encoding, "shape": list(stored_shape), "dtype": "uint8", "layout": "HWC",
                  **({"npy_header_bytes": npy_header_bytes(stored_shape)} if encoding == "npy" else {}),
                  # Only where given: a jpg cache built before --quality (at JPEG_QUALITY) keeps its identity.
                  **({"quality": settings.quality} if settings.quality not in (None, JPEG_QUALITY) else {})},
        "output_shape": list(settings.shape),
        "shard_size": per_shard,
        "classes": list(source.classes),
        **({"teacher": manifest_block(settings.teacher, device and torch.device(device))} if settings.teacher
           else {}),
        **({"mask": settings.mask.block()} if settings.mask else {}),
        "epoch_fingerprints": [epoch_fingerprint(make_transform(spec, epoch=e, epochs=epochs, size=size,
                                                                schedule=config.schedule))
                               for e in range(epochs)],
    }


def _resolve_spec(spec: str, source: Source, side: int) -> str:
    """`auto`: the mnist preset for (Fashion-)MNIST, cifar for images of at most 64 px, else imagenet."""
    if spec != "auto":
        return spec
    if source.mask_classes is not None:
        return "seg"
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
    _check_channels(settings.encoding, first.shape[2])
    encoded = np.mean([len(encode(out, settings.encoding, settings.quality)) for out in outputs])
    return first.shape, to_hwc_uint8(augment.to_channels(image)).shape, float(encoded)


def _check_channels(encoding: str, channels: int) -> None:
    if encoding in ("png", "jpg") and channels not in (1, 3):
        raise CachegenError(f"--format {encoding} stores 1 or 3 channels, these images have {channels}"
                            f"{' (RGBA)' if channels == 4 else ''}: pass --channels 3 (or 1), or --format npy")


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
