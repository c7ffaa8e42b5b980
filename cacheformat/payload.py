"""Decode one stored sample's payload (npy, png, jpg) into its pixels: the one decode path of the
builder (resume, `cachegen verify`) and the readers.

A payload is untrusted bytes. Any codec failure becomes a one-line FormatError naming the shard
and the sample, never a crash: torchvision's PNG decoder (libpng) turns a libpng error into a
segfault, so a PNG reaches it only after a full structural check (`png_problem`) that leaves libpng
nothing to complain about. torch and torchvision are imported when a png/jpg payload is decoded,
not when this module is, so `cacheformat` stays importable without them.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import zlib

import numpy as np

from cacheformat.errors import FormatError

NPY_MAGIC = b"\x93NUMPY"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA (8 bits each)
PNG_FILTERS = 5  # a row's first byte: none, sub, up, average, paeth


class CodecMessages:
    """What C codecs print on stderr while open (libjpeg's "Corrupt JPEG data: ..." warnings), caught
    instead of reaching the terminal, and named as damage by `decode_payload(messages=...)`.

    It points file descriptor 2 at a temporary file: only for a process that decodes in one thread
    and prints nothing else meanwhile (`cachegen verify`, the builder indexing a shard on resume).
    """

    def __enter__(self) -> "CodecMessages":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self._read = 0
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()

    def take(self) -> str:
        """What was printed since the last take."""
        end = os.lseek(self._file.fileno(), 0, os.SEEK_END)
        if end == self._read:
            return ""
        text = os.pread(self._file.fileno(), end - self._read, self._read)
        self._read = end
        return text.decode(errors="replace")


def decode_payload(payload, encoding: str, shape: tuple[int, int, int], *, where: str,
                   npy_header: bytes = b"", messages: CodecMessages | None = None) -> np.ndarray:
    """The HWC uint8 pixels of one sample's payload (bytes, or a 1-D uint8 array).

    `where` names the sample in the error ("shard-000003.tar: sample 12"); `npy_header` is the exact
    .npy header an npy payload must start with; with `messages`, a codec's warning is damage too.

    Raises:
        FormatError: the payload is not a `shape` image in `encoding`, in one line.
    """
    data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
    if encoding == "npy":
        if data[:len(npy_header)] != npy_header or len(data) != len(npy_header) + int(np.prod(shape)):
            raise _damaged(where, encoding, "not a .npy payload of this cache's header and size")
        return np.frombuffer(data, np.uint8, offset=len(npy_header)).reshape(shape)
    problem = png_problem(data, shape) if encoding == "png" else None
    if problem:
        raise _damaged(where, encoding, problem)
    image = _decode_image(data, shape, where, encoding)
    printed = messages.take().strip() if messages is not None else ""
    if printed:
        raise _damaged(where, encoding, printed.splitlines()[0])
    h, w, c = shape
    if tuple(image.shape) != (c, h, w):
        raise _damaged(where, encoding, f"it decodes to CHW shape {list(image.shape)}, the manifest says {[c, h, w]}")
    return image.permute(1, 2, 0).numpy()


def decode_jpegs(payloads: list, shape: tuple[int, int, int], *, device, where: list[str]):
    """A batch of jpg payloads (1-D uint8 CPU tensors) decoded in one call of torchvision's
    `decode_jpeg` on `device` (nvJPEG on CUDA: no host wait), as (B, C, H, W) uint8 there.

    `where` names each sample. The batched call says nothing of which sample failed, so on a
    failure each payload is decoded alone through `decode_payload` (the CPU path, every check of
    it), whose error names the first damaged one; where every one decodes there (a JPEG the
    device's decoder does not support), the batch is the CPU's decodes, moved to `device`.

    Raises:
        FormatError: a payload that is not a `shape` JPEG, named, in one line.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    h, w, c = shape
    modes = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}
    try:
        images = decode_jpeg(payloads, mode=modes.get(c, ImageReadMode.UNCHANGED), device=device)
    except Exception as e:  # noqa: BLE001 - the damaged payload is found and named below
        if not payloads:
            raise _damaged("an empty batch", "jpg", f"{type(e).__name__}: {e}") from None
        pixels = [decode_payload(payload.numpy(), "jpg", shape, where=name) for payload, name in zip(payloads, where)]
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous().to(device)
    for image, name in zip(images, where):  # shapes are metadata: no wait on the device
        if tuple(image.shape) != (c, h, w):
            raise _damaged(name, "jpg", f"it decodes to CHW shape {list(image.shape)}, the manifest says {[c, h, w]}")
    return torch.stack(images) if images else torch.empty((0, c, h, w), dtype=torch.uint8, device=device)


def _decode_image(data: bytes, shape: tuple[int, int, int], where: str, encoding: str):
    """torchvision's decode of png/jpg bytes as a CHW uint8 tensor of `shape`'s channels."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    modes = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}
    try:
        # A writable copy: torch warns (on the user's terminal) when it wraps read-only bytes.
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=modes.get(shape[2], ImageReadMode.UNCHANGED))
    except Exception as e:  # noqa: BLE001 - whatever the codec raises is the payload's damage, named
        raise _damaged(where, encoding, f"{type(e).__name__}: {e}") from None


def _damaged(where: str, encoding: str, what: str) -> FormatError:
    return FormatError(f"{where} does not decode as {encoding} ({what[:160]}); the shard is damaged: "
                       "delete it and re-run the same `cachegen build` to rewrite it")


def png_problem(png: bytes, shape: tuple[int, int, int]) -> str | None:
    """What keeps `png` from being exactly a PNG the builder writes for `shape`, or None.

    The builder writes IHDR, IDAT..., IEND, 8 bits per channel, not interlaced. Checked: the
    signature, each chunk's length and CRC, that chunk sequence, the header against `shape`, and
    that the pixel data inflates (zlib's own check included) to exactly one filter byte and
    W*C bytes per row with known filter types: everything libpng would stop on.
    """
    if not png.startswith(PNG_SIGNATURE):
        return "no PNG signature"
    chunks, pos = [], len(PNG_SIGNATURE)
    while not chunks or chunks[-1][0] != b"IEND":
        if pos + 12 > len(png):
            return "no IEND chunk (truncated)"
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(png):
            return f"chunk {kind!r} runs past the end"
        if zlib.crc32(png[pos + 4:end]) != int.from_bytes(png[end:end + 4], "big"):
            return f"chunk {kind!r} fails its CRC"
        chunks.append((kind, png[pos + 8:end]))
        pos = end + 4
    kinds = [kind for kind, _ in chunks]
    if kinds[0] != b"IHDR" or kinds.count(b"IHDR") != 1 or set(kinds[1:-1]) != {b"IDAT"}:
        return f"chunks {b' '.join(kinds)[:60]!r} are not IHDR, IDAT..., IEND"
    h, w, c = shape
    if c not in PNG_COLOR_TYPE or chunks[0][1] != struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPE[c], 0, 0, 0):
        return f"its header is not that of a {w}x{h} {c}-channel 8-bit image"
    return _idat_problem(b"".join(data for _, data in chunks[1:-1]), h, w * c + 1)


def _idat_problem(stream: bytes, rows: int, row_bytes: int) -> str | None:
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stream, rows * row_bytes + 1)  # at most one byte more than a whole image
        ended = inflate.eof and not inflate.unused_data and not inflate.unconsumed_tail
    except zlib.error as e:
        return f"its pixel data does not inflate ({e})"
    if len(raw) != rows * row_bytes or not ended:
        return f"its pixel data inflates to {len(raw)}{'+' if not ended else ''} bytes, not {rows * row_bytes}"
    if (np.frombuffer(raw, np.uint8)[::row_bytes] >= PNG_FILTERS).any():
        return "a row has an unknown filter type"
    return None
