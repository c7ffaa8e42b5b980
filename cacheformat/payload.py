"""Decode one stored sample's payload (npy, png, jpg) into its pixels: the one decode path of the
builder (resume, `cachegen verify`) and the readers.

A payload is untrusted bytes. Any codec failure becomes a one-line FormatError naming the shard
and the sample, never a crash: torchvision's PNG decoder (libpng) turns a libpng error into a
segfault, so a PNG reaches it only after a full structural check (`png_problem`) that leaves libpng
nothing to complain about. torch and torchvision are imported when a png/jpg payload is decoded,
not when this module is, so `cacheformat` stays importable without them.
"""

from __future__ import annotations

import math
import os
import re
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
# The most pixel bytes a payload may decode to per byte it holds. zlib expands at most ~1032x (a
# PNG's pixels, checked exactly by png_problem); a baseline JPEG as libjpeg writes it (standard
# Huffman tables, 4:2:0) at most ~200x. Above this the manifest's shape is not one its payloads
# can hold: the decode is refused before anything of the shape's size is allocated.
MAX_EXPANSION = 2048
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG, DAC are not)
JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: markers without a length
JPEG_MAX_SEGMENTS = 64  # before the image data; the builder (libjpeg) writes under 10
_JPEG_FILL = re.compile(rb"\xff+")  # a marker's 0xFF and any fill bytes before its code


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
    problem = expansion_problem(len(data), shape) or (png_problem if encoding == "png" else jpeg_problem)(data, shape)
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

    `where` names each sample. Each payload's size and frame header are checked against `shape`
    first, as decode_payload checks them. The batched call says nothing of which sample failed, so on a
    failure each payload is decoded alone through `decode_payload` (the CPU path, every check of
    it), whose error names the first damaged one; where every one decodes there (a JPEG the
    device's decoder does not support), the batch is the CPU's decodes, moved to `device`.

    Raises:
        FormatError: a payload that is not a `shape` JPEG, named, in one line.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    h, w, c = shape
    for payload, name in zip(payloads, where):  # headers checked first: the decoder allocates what they say
        data = payload.numpy().tobytes()
        problem = expansion_problem(len(data), shape) or jpeg_problem(data, shape)
        if problem:
            raise _damaged(name, "jpg", problem)
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


def expansion_problem(payload_bytes: int, shape: tuple[int, int, int]) -> str | None:
    """Why a payload of `payload_bytes` cannot hold a `shape` image (more than MAX_EXPANSION times
    its size in pixels), or None: what bounds a png/jpg decode's memory by the shard file's size."""
    pixels = math.prod(shape)
    if pixels > MAX_EXPANSION * payload_bytes:
        return (f"{payload_bytes} bytes cannot hold a {shape[1]}x{shape[0]} {shape[2]}-channel image "
                f"({pixels} bytes, more than {MAX_EXPANSION}x)")
    return None


def jpeg_problem(jpg: bytes, shape: tuple[int, int, int]) -> str | None:
    """What keeps `jpg` from being a JPEG of `shape`'s height and width, from its headers, or None.

    libjpeg allocates for the frame header's (SOF) dimensions before it reads a pixel, whatever the
    payload's size; torchvision.io has no header-only reader (decode_image reads the header and
    decodes in one call), so the markers are walked here: from SOI, each marker segment by its
    length, up to the first scan (SOS), at most JPEG_MAX_SEGMENTS of them; exactly one frame
    header, of `shape`'s height and width. Cheap: a few segments, no pixel touched.
    """
    if not jpg.startswith(b"\xff\xd8"):
        return "no JPEG start-of-image marker"
    pos, frames = 2, []
    for _ in range(JPEG_MAX_SEGMENTS):
        if jpg[pos:pos + 1] != b"\xff":
            return "a marker is missing or truncated before its image data"
        pos += 1
        if jpg[pos:pos + 1] == b"\xff":  # fill bytes: rare, skipped in one regex match
            pos = _JPEG_FILL.match(jpg, pos).end()
        if pos >= len(jpg):
            return "a marker is missing or truncated before its image data"
        marker = jpg[pos]
        pos += 1
        if marker == 0xDA:  # start of scan: the frame header comes before it
            break
        if marker == 0xD9:
            return "it ends before its image data"
        if marker in JPEG_STANDALONE:
            continue
        length = int.from_bytes(jpg[pos:pos + 2], "big")
        if length < 2 or pos + length > len(jpg):
            return f"marker 0x{marker:02X}'s segment runs past the end"
        if marker in JPEG_SOF:
            if length < 8:
                return "its frame header is cut"
            frames.append(struct.unpack(">HH", jpg[pos + 3:pos + 7]))
        pos += length
    else:
        return f"more than {JPEG_MAX_SEGMENTS} segments before its image data"
    if len(frames) != 1:
        return f"{len(frames)} frame headers (SOF), not one"
    h, w = shape[:2]
    if frames[0] != (h, w):
        return f"its frame header says {frames[0][1]}x{frames[0][0]}, the manifest {w}x{h}"
    return None


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
