"""Read a window of shards into one uint8 array (mapped, not tar-parsed), and cut it into batches."""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from readers.errors import ReaderError
from readers.manifest import Manifest, Shard
from readers.plan import EpochPlan, Segment

NPY_MAGIC = b"\x93NUMPY"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ShardReader:
    """Reads segments of a cached epoch's shards into a (samples, H*W*C) uint8 window array.

    A raw (npy) shard is memory-mapped and its pixel rows, found from the manifest's offsets,
    are copied into the window with one strided copy: no tar parsing, no per-sample work, and
    only the pixel bytes leave the page cache. png/jpg payloads are decoded with torchvision.io.
    The window array is reused, so memory stays at one window however long training runs.
    """

    def __init__(self, manifest: Manifest, *, verify: bool = False) -> None:
        self._manifest = manifest
        self._verify = verify
        self._window = torch.empty((0, manifest.image_bytes), dtype=torch.uint8)

    @property
    def shape(self) -> tuple[int, int, int]:
        """H, W, C of every image."""
        return self._manifest.shape

    def load(self, shards: Sequence[Shard], segments: Sequence[Segment]) -> tuple[torch.Tensor, np.ndarray]:
        """(images, labels) of `segments` laid end to end; `images` is valid until the next load."""
        n = sum(s.stop - s.start for s in segments)
        if len(self._window) < n:
            self._window = torch.empty((n, self._manifest.image_bytes), dtype=torch.uint8)
        window, row = self._window[:n], 0
        for seg in segments:
            shard = shards[seg.shard]
            self._copy(shard, self._map(shard), seg.start, seg.stop, window[row:row + seg.stop - seg.start])
            row += seg.stop - seg.start
        labels = np.concatenate([shards[s.shard].labels[s.start:s.stop] for s in segments])
        return window, labels

    def _copy(self, shard: Shard, data: np.ndarray, start: int, stop: int, out: torch.Tensor) -> None:
        m = self._manifest
        if stop == start:
            return
        if m.encoding == "npy" and shard.stride is not None:
            first = int(shard.offsets[start]) + m.npy_header_bytes
            rows = np.lib.stride_tricks.as_strided(data[first:], (stop - start, m.image_bytes), (shard.stride, 1))
            out.copy_(torch.from_numpy(rows))
            return
        for i, j in enumerate(range(start, stop)):
            offset, size = int(shard.offsets[j]), int(shard.sizes[j])
            if m.encoding == "npy":
                out[i] = torch.from_numpy(data[offset + m.npy_header_bytes:offset + size])
            else:
                out[i] = self._decode(shard, data[offset:offset + size], j)

    def _decode(self, shard: Shard, payload: np.ndarray, j: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        m = self._manifest
        h, w, c = m.shape
        mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}.get(c, ImageReadMode.UNCHANGED)
        try:
            damage = _png_damage(payload.tobytes()) if m.encoding == "png" else None
            if damage:
                raise RuntimeError(damage)
            image = decode_image(torch.from_numpy(payload), mode=mode)
        except RuntimeError as e:
            raise ReaderError(f"{shard.path}: sample {j} does not decode as {m.encoding} ({e}); "
                              "the shard is damaged: re-run `cachegen build` to rebuild it") from None
        if tuple(image.shape) != (c, h, w):
            raise ReaderError(f"{shard.path}: sample {j} decodes to CHW shape {list(image.shape)}, "
                              f"the manifest says {[c, h, w]}")
        return image.permute(1, 2, 0).reshape(-1)

    def _map(self, shard: Shard) -> np.ndarray:
        """The shard file's bytes, mapped copy-on-write (writable for torch, never written)."""
        try:
            f = open(shard.path, "rb", buffering=0)
        except FileNotFoundError:
            raise ReaderError(f"shard {shard.path} is missing (the manifest lists it); "
                              "re-run `cachegen build` to rebuild it") from None
        except OSError as e:
            raise ReaderError(f"cannot open shard {shard.path}: {e.strerror or e}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != shard.bytes:
                raise ReaderError(f"shard {shard.path} is {size} bytes, the manifest says {shard.bytes} "
                                  "(truncated or replaced); re-run `cachegen build` to rebuild it")
            data = np.zeros(0, np.uint8)
            if size:
                try:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    if hasattr(mmap, "MADV_WILLNEED"):
                        mapped.madvise(mmap.MADV_WILLNEED)  # read the whole file ahead if it is cold
                    data = np.frombuffer(mapped, np.uint8)
                except OSError:  # a file system that cannot map files: read it instead
                    data = np.empty(size, np.uint8)
                    if f.readinto(memoryview(data)) != size:
                        raise ReaderError(f"shard {shard.path} ended before {size} bytes (truncated)") from None
        if self._verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            raise ReaderError(f"shard {shard.path} fails its sha256 check (corrupted); "
                              "re-run `cachegen build` to rebuild it")
        if self._manifest.encoding == "npy" and shard.samples:
            # Every sample, not just the first: an offset edited to another place inside the file
            # would otherwise deliver the wrong bytes as pixels (~25 us for 1000 samples).
            offsets = shard.offsets
            ok = offsets + len(NPY_MAGIC) <= size
            at = np.where(ok, offsets, 0)
            for i, byte in enumerate(NPY_MAGIC):
                ok &= data[at + i] == byte
            bad = np.flatnonzero(~ok)
            if len(bad):
                j = int(bad[0])
                raise ReaderError(f"shard {shard.path}: no .npy payload at offset {int(shard.offsets[j])} "
                                  f"(sample {j}); the file does not match the manifest")
        return data


def _png_damage(png: bytes) -> str | None:
    """What breaks a PNG's chunk structure (signature, lengths, CRCs), or None when it is intact.

    Checked before decoding: torchvision's decode_png (0.29) turns a libpng error past the header
    (a flipped byte in the pixel data) into a segfault, not an exception. Costs one crc32 pass.
    """
    if not png.startswith(PNG_SIGNATURE):
        return "no PNG signature"
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(png):  # chunk: length (4), type (4), data (length), crc (4)
        length = int.from_bytes(png[pos:pos + 4], "big")
        kind, end = png[pos + 4:pos + 8], pos + 8 + length
        if end + 4 > len(png):
            return f"chunk {kind!r} runs past the end"
        if zlib.crc32(png[pos + 4:end]) != int.from_bytes(png[end:end + 4], "big"):
            return f"chunk {kind!r} fails its CRC"
        if kind == b"IEND":
            return None
        pos = end + 4
    return "no IEND chunk (truncated)"


def iter_batches(reader: ShardReader, shards: Sequence[Shard], plan: EpochPlan, *, start: int = 0,
                 new_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], channels_first: bool = False,
                 stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the plan's batches from batch `start` on: (images uint8, labels (n,) int64), images
    (n, H, W, C), or (n, C, H, W) with `channels_first` (the transpose rides along with the gather).

    `new_batch(n)` gives empty tensors of that shape (pinned when batches go to a GPU); each is
    filled by one index_select from the window (two when it straddles windows). Few, large
    calls matter: each torch call hands the GIL over, and a consumer thread wants it too.
    """
    h, w, c = reader.shape
    batch_size = plan.batch_size
    skip = start * batch_size  # samples to pass over before the first one delivered
    remaining = plan.num_samples - skip
    images = labels = flat = None
    filled = want = 0
    for window in plan.windows:
        if remaining <= 0 or stop():
            return
        if skip >= len(window):
            skip -= len(window)
            continue
        pixels, window_labels = reader.load(shards, window.segments)
        if channels_first:
            pixels = pixels.view(-1, h * w, c).permute(0, 2, 1)
        order = torch.from_numpy(window.order)
        window_labels = torch.from_numpy(window_labels[window.order])
        pos, skip = skip, 0
        while pos < len(window) and remaining > 0:
            if images is None:
                want = min(batch_size, remaining)
                images, labels = new_batch(want)
                flat, filled = images.view(want, *pixels.shape[1:]), 0
            n = min(want - filled, len(window) - pos)
            torch.index_select(pixels, 0, order[pos:pos + n], out=flat[filled:filled + n])
            labels[filled:filled + n] = window_labels[pos:pos + n]
            filled += n
            pos += n
            if filled == want:
                remaining -= want
                yield images, labels
                images = None
