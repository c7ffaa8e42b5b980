"""`cachegen preview`: a grid of a few samples (rows) through the epochs of a cache (columns)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import functional as F
from torchvision.utils import make_grid

from cachegen.augmenter import Augmenter, BuildSettings
from cacheaug.batched import augment_batch, batch_seed, make_batched
from cacheaug.transforms import CacheFactory, augment, borrowed_rng, make_transform, to_hwc_uint8, to_pil
from cachegen.errors import CachegenError
from cacheformat import FormatError
from cacheformat.index import read_index
from cachegen.manifest import Manifest, load_manifest
from cachegen.shards import read_image
from cachegen.cachesource import source_of
from cachegen.trust import trusted_factory

MIN_TILE = 96  # pixels: smaller images are scaled up by a whole factor to at least this
PAD = 2  # pixels between tiles
LABEL_HEIGHT = 14  # the strip above the grid that names the columns


def _indexed(m: Manifest, shards) -> list[dict]:
    """The shards with their index files' per-sample lists, as `read_image` takes them."""
    out = []
    for shard in shards:
        index = read_index(m, shard)
        out.append({"path": shard.relpath, "offsets": index.offsets.tolist(), "sizes": index.sizes.tolist(),
                    "indices": index.indices.tolist()})
    return out


def _shard_positions(shards: list[dict], wanted: set[int]) -> dict[int, tuple[dict, int]]:
    """Where each wanted source index sits: (shard entry, position in it)."""
    found = {}
    for shard in shards:
        for j, index in enumerate(shard["indices"]):
            if index in wanted:
                found[index] = (shard, j)
    return found


def _build_settings(m: dict, source) -> BuildSettings:
    t = m["transform"]
    # The channels the build converted the source to: the stored source's (live), or where a
    # transform keeps them (every preset), the output's.
    channels = m["image"]["shape"][2] if m["mode"] == "live" else m["output_shape"][2]
    return BuildSettings(source=source, root=Path("."), spec=t["spec"], epochs=m["epochs"], size=t["size"],
               schedule=t["schedule"], seed=m["seed"], encoding=m["image"]["encoding"], on_error="fail",
               resize=t["resize"], channels=channels if channels in (1, 3) else None,
               shape=tuple(m["output_shape"]), source_shape=tuple(m["image"]["shape"]))


class _StoredSourcePass:
    """A live cache's source pass, as a Source: the images the transform starts from."""

    def __init__(self, root: Path, m: dict, positions: dict) -> None:
        self.root, self.m, self.positions = root, m, positions

    def load(self, index: int) -> Image.Image:
        shard, j = self.positions[index]
        pixels = read_image(self.root, shard, j, self.m["image"])
        return to_pil(pixels)

    def name(self, index: int) -> str:
        return f"sample {index}"


def _original(root: Path, m: dict, indices: list[int], source_spec: str | None,
              say: Callable[[str], None]) -> list[np.ndarray] | None:
    """The un-augmented source images (resized as the build did); None, said, where the source is
    not where the build recorded it (or is no longer what it was), unless `source_spec` (--source)
    says where it is: then that must be the source."""
    try:
        source = source_of(root, m, source_spec)
    except CachegenError as e:
        if source_spec is not None:
            raise
        say(f"cachegen preview: no 'original' column: {e}")
        return None
    augmenter = Augmenter(_build_settings(m, source))  # loads and resizes only: no transform is made
    return [to_hwc_uint8(augmenter.load(i)) for i in indices]


def preview(root: Path, out: Path, *, samples: int = 6, epochs: int = 8, trust_code: bool = False,
            source: str | None = None, say: Callable[[str], None] = print) -> tuple[int, int]:
    """Write a PNG grid to `out`: one row per sample, the original then each epoch. Returns (rows, columns).

    A cached cache's originals come from its source (`source`: where it is now, where it moved);
    without it, the grid has no original column, and `say` tells why.

    A live cache whose transform is a `module:factory` is previewed only with `trust_code` (its
    code runs; cacheaug.transforms.cache_factory); a cached one runs no code."""
    root = Path(root)
    checked = load_manifest(root)
    m = checked.raw
    live = m["mode"] == "live"
    factory = trusted_factory(root, m, trust_code) if live else None  # before anything else: nothing runs untrusted
    passes = [checked.source_shards] if live else checked.epochs[:min(epochs, m["epochs"])]
    indexed = [_indexed(checked, shards) for shards in passes]
    indices = [i for s in indexed[0] for i in s["indices"]][:samples]
    shown = min(epochs, m["epochs"])
    if live:
        stored = _StoredSourcePass(root, m, _shard_positions(indexed[0], set(indices)))
        originals = [read_image(root, *stored.positions[i], m["image"]) for i in indices]
        if checked.augment_on == "device":  # the shown samples as one batch per epoch, as a device loader would
            columns = list(zip(*(_batched(checked, e, originals, factory) for e in range(shown))))
        else:
            with borrowed_rng():  # the caller's generators, given back once
                columns = _per_sample(checked, stored, indices, shown, factory)
    else:
        originals = _original(root, m, indices, source, say)
        by_epoch = [_shard_positions(indexed[e], set(indices)) for e in range(shown)]
        columns = [[read_image(root, *by_epoch[e][i], m["image"]) for e in range(shown)] for i in indices]
    h, w, c = m["output_shape"]
    tiles = []
    for row, index in enumerate(indices):
        if originals is not None:
            tiles.append(F.resize(_chw(originals[row], c), [h, w], antialias=True))
        tiles += [_chw(x, c) for x in columns[row]]
    per_row = shown + (originals is not None)
    labels = (["original"] if originals is not None else []) + [f"epoch {e}" for e in range(shown)]
    _save(_labelled(_grid(tiles, per_row), labels, tile_width=w * scale_for(h, w)), out)
    return len(indices), per_row


def _per_sample(m: Manifest, stored: _StoredSourcePass, indices: list[int], shown: int,
                factory: CacheFactory | None) -> list[list[np.ndarray]]:
    """Each of `indices` augmented per sample in each of the first `shown` epochs, as LiveLoader's
    per-sample path gives it (the builder's seeds, the reader's factory)."""
    t = m.raw["transform"]
    columns = []
    for e in range(shown):
        transform = make_transform(t["spec"], epoch=e, epochs=m.num_epochs, size=t["size"], schedule=t["schedule"],
                                   factory=factory)
        try:
            column = [augment(transform, stored.load(i), seed=m.seed, epoch=e, index=i) for i in indices]
        except FormatError:  # ours, already one line (the output is not an image)
            raise
        except Exception as err:
            raise CachegenError(f"transform {t['spec']} failed in preview: {type(err).__name__}: {err}") from None
        if any(out.shape != m.output_shape for out in column):
            raise CachegenError(f"transform {t['spec']} gave images of another shape than the cache's "
                                f"{m.output_shape} in epoch {e}: it is not the transform the cache was built with")
        columns.append(column)
    return [list(row) for row in zip(*columns)]


def scale_for(h: int, w: int) -> int:
    """The whole factor small images are drawn at: tiles at least MIN_TILE pixels on their longer
    side (a 32 px cache is drawn at 3x), each pixel a square of pixels (nearest: nothing blurred)."""
    return max(1, -(-MIN_TILE // max(h, w)))


def _grid(tiles: list[torch.Tensor], per_row: int) -> Image.Image:
    """The tiles (CHW uint8), scaled up by `scale_for`, in rows of `per_row`, PAD pixels apart."""
    k = scale_for(*tiles[0].shape[1:])
    big = torch.stack(tiles).repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    grid = make_grid(big, nrow=per_row, padding=PAD, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def _labelled(grid: Image.Image, labels: list[str], tile_width: int) -> Image.Image:
    """`grid` below a strip naming each column: the original, then each epoch."""
    out = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
    out.paste(grid, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    for column, label in enumerate(labels):
        draw.text((PAD + column * (tile_width + PAD), 2), label, fill="black")
    return out


def _save(image: Image.Image, out: Path) -> None:
    try:
        image.save(out)
    except (OSError, ValueError, KeyError) as e:
        raise CachegenError(f"cannot write {out}: {e}; give a writable path ending in .png") from None


def _batched(m: Manifest, epoch: int, images: list[np.ndarray], factory: CacheFactory | None) -> list[np.ndarray]:
    """`images` (HWC uint8) augmented as one batch with the cache's batched augmentation of `epoch`."""
    t = m.raw["transform"]
    batched = make_batched(t["spec"], epoch=epoch, epochs=m.num_epochs, size=t["size"], channels=m.shape[2],
                           schedule=t["schedule"], factory=factory)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    h, w, c = m.output_shape
    out = augment_batch(batched, batch, seed=batch_seed(m.seed, epoch, 0), name=t["spec"], shape=(c, h, w))
    return list(out.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _chw(image: np.ndarray, channels: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, as torch wants
    return t.expand(channels, -1, -1) if t.shape[0] == 1 and channels > 1 else t
