"""CachedLoader: stream a cache's pre-augmented epochs to the device as normalised batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from readers.decode import check_decode_on
from readers.loader import Loader
from readers.options import passes_options_to
from readers.plan import EpochPlan
from readers.shards import ShardFiles
from readers.batch_transform import with_masks
from readers.masks import widen
from readers.teacher import check_targets


class CachedLoader(Loader):
    """Batches of a cache built by `cachegen build`, on the device, in a seeded order.

    Training epoch e reads cached epoch e mod N (set it with set_epoch). Each rank reads a
    contiguous share of the epoch's shards in a (seed, epoch)-shuffled order; samples are
    shuffled within windows of `shuffle_window` samples. Shards are mapped on first use and kept
    open (up to a quarter of the file-descriptor limit); each batch is gathered from the mappings
    in one copy. Batches are assembled as uint8 (in
    pinned memory, `prefetch` batches ahead in a background thread, when the device is CUDA),
    moved, then converted to `dtype` and normalised with the manifest's mean and std on the device.

    Args:
        cache: the cache folder (the one holding manifest.json).
        batch_size: samples per batch; without drop_last the last batch may be smaller.
        device: where batches go; None: cuda if available, else cpu. An index-less cuda is the GPU
            LOCAL_RANK names (torchrun, Lightning, Accelerate), else the current one, when a pass
            starts (docs/gpu.md).
        shuffle: shuffle shards and samples each epoch; False reads in manifest order.
        seed: with the epoch, fixes the order: the same seed gives the same batches anywhere.
        drop_last: drop each rank's last partial batch (and the remainder of an epoch that does
            not split evenly between ranks); otherwise ranks pad by repeating a few samples.
        normalize: (pixel / 255 - mean) / std in `dtype`; False gives uint8.
        mean, std: per channel, [0, 1] units, to normalise with instead of the manifest's (a val
            cache with its train cache's statistics).
        dtype: float32, float16 or bfloat16 (with normalize).
        channels_last: images in channels_last memory format (free: the cache stores HWC).
        rank, world_size: this process's share; None: from torch.distributed when initialised.
        prefetch: batches a background thread assembles ahead of the consumer; 0: none, batches
            are assembled in the consumer's thread; None: 2 on CUDA, 0 on the CPU.
        shuffle_window: samples shuffled together (consecutive shards of this rank's share, at
            least one); costs no memory, but each shard a batch touches costs one gather call.
        verify: check each shard's sha256 as it is read.
        decode_threads: threads decoding a png/jpg cache's batches (torchvision's decoders release
            the GIL, so threads scale with the cores); None: this process's share of the cores,
            as many as the workers of a build; 1: decoded in the thread assembling the batch.
        decode_on: where a jpg cache is decoded: "cpu" (in decode_threads threads), "device" (the
            payloads travel compressed and each batch is decoded in one call on the loader's device:
            nvJPEG on CUDA, libjpeg-turbo on the CPU), "auto": "device" on CUDA, else "cpu".
            "device" for a png or npy cache is refused.
        targets: "labels": batches are (images, labels); "teacher" (a cache built with `cachegen
            build --teacher`): (images, labels, teacher), teacher a float32 (B, classes) tensor on
            the device holding the stored top-K teacher probabilities, zeros elsewhere; "mask" (a
            cache built from a source with masks): (images, masks), masks int64 (B, H, W) class
            indices on the device, aligned pixel for pixel with the images; a batch_transform is
            then called with (images, tv_tensors.Mask(masks)) and returns (images, masks): a
            torchvision v2 transform moves both.
        batch_transform: a callable (images, labels) -> (images, targets) run on every batch on
            the device after normalisation (torchvision's v2.MixUp, v2.CutMix, v2.RandomChoice of
            them, timm's Mixup, your own), under torch's, numpy's and `random`'s generators seeded
            per batch from (seed, epoch, batch, rank layout) and given back: batches stay
            deterministic and resume exactly; targets may be soft labels (B, classes). An
            nn.Module is moved to `device`. See docs/batch-transforms.md.
        local: for a cache at a URL (s3://bucket/prefix, gs://..., any fsspec protocol): the local
            folder its manifest, indexes and shards are staged in (in `local/<manifest digest>/`),
            shared by the processes of a node. Each pass fetches the indexes of this rank's shards,
            then its shards `download_ahead` (4) ahead of the consumer in `download_threads` (4)
            threads; each file is checked against the manifest's size and sha256 as it downloads
            and renamed into place only then; a failure is retried `download_retries` (5) times,
            waiting `download_backoff` (0.5 s) doubling, then a ReaderError names the URL.
            `cache_limit` (bytes; None: no limit) bounds the shards staged in `local` by all the
            loaders of the node sharing it: the least recently fetched shards no loader is reading
            are deleted to make room (docs/reading-at-scale.md). `storage_options`: passed to fsspec
            (credentials and endpoints otherwise come from AWS_* variables, ~/.aws, fsspec config).

    Raises:
        ReaderError: no cache, a damaged manifest, or more ranks than the epoch can feed.
        ValueError: an option out of range, quoted.
    """

    MODE = "cached"

    @passes_options_to(Loader.__init__)
    def __init__(self, cache: str | Path, *, batch_size: int, verify: bool = False, targets: str = "labels",
                 decode_threads: int | None = None, decode_on: str = "auto", **options) -> None:
        super().__init__(cache, batch_size=batch_size, **options)
        self.verify = bool(verify)
        check_targets(targets, self.manifest)
        self.targets = targets
        if targets == "mask":
            self._labels_to = widen(self.manifest.mask.dtype, self.manifest.mask.shape)
            self.batch_transform = with_masks(self.batch_transform)
        self._check_epochs()
        self.decode_on = check_decode_on(decode_on, self.manifest.encoding)
        self._files = ShardFiles(self.manifest, verify=self.verify, stager=self._stager,  # mappings kept between epochs
                                 teacher=targets == "teacher", mask=targets == "mask", decode_threads=decode_threads)

    def _shard_sizes(self, cache_epoch: int) -> list[int]:
        return [s.samples for s in self.manifest.epochs[cache_epoch]]

    def _host_batches(self, plan: EpochPlan, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._gather(self._files, self.manifest.epochs[plan.cache_epoch], plan, start)
