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
from cacheaug.batched import augment_batch, augment_batch_pair, batch_seed, make_batched, make_batched_pair
from cacheaug.transforms import (CacheFactory, augment, augment_pair, borrowed_rng, make_transform, to_hwc_uint8,
                                 to_pil)
from cachegen.errors import CachegenError
from cacheformat import FormatError
from cacheformat.index import read_index
from cachegen.manifest import Manifest, load_manifest
from cachegen.shards import read_image, read_mask
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
    """A live cache's source pass, as a Source: the images (and masks) the transform starts from."""

    def __init__(self, root: Path, m: dict, positions: dict, mask=None) -> None:
        self.root, self.m, self.positions, self.mask = root, m, positions, mask

    def load_mask(self, index: int) -> np.ndarray:
        return read_mask(self.root, *self.positions[index], self.mask)

    def load(self, index: int) -> Image.Image:
        shard, j = self.positions[index]
        pixels = read_image(self.root, shard, j, self.m["image"])
        return to_pil(pixels)

    def name(self, index: int) -> str:
        return f"sample {index}"


def _original(root: Path, m: dict, indices: list[int], source_spec: str | None,
              say: Callable[[str], None]) -> list[np.ndarray] | None:
    """The un-augmented source images (resized as the build did; with their masks drawn over them
    in a cache with masks); None, said, where the source is not where the build recorded it (or is
    no longer what it was), unless `source_spec` (--source) says where it is: then that must be the
    source."""
    try:
        source = source_of(root, m, source_spec)
    except CachegenError as e:
        if source_spec is not None:
            raise
        say(f"cachegen preview: no 'original' column: {e}")
        return None
    augmenter = Augmenter(_build_settings(m, source))  # loads and resizes only: no transform is made
    if "mask" in m:
        pairs = [augmenter.load_pair(i) for i in indices]
        return [overlay(to_hwc_uint8(image), mask) for image, mask in pairs]
    return [to_hwc_uint8(augmenter.load(i)) for i in indices]


# Mask classes drawn over images: class k > 0 in PALETTE[(k - 1) % len], half opaque; 0 (the
# background, by convention) left as it is.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)],
                   np.uint16)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An HWC uint8 image with its (H, W) mask drawn over it: each class > 0 in its colour, half opaque."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    colour = PALETTE[(np.maximum(mask, 1) - 1) % len(PALETTE)]
    blended = ((rgb.astype(np.uint16) + colour) // 2).astype(np.uint8)
    return np.where((mask > 0)[..., None], blended, rgb)


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
        stored = _StoredSourcePass(root, m, _shard_positions(indexed[0], set(indices)), checked.mask)
        originals = [read_image(root, *stored.positions[i], m["image"]) for i in indices]
        masks = [stored.load_mask(i) for i in indices] if checked.mask is not None else None
        if checked.augment_on == "device":  # the shown samples as one batch per epoch, as a device loader would
            columns = list(zip(*(_batched(checked, e, originals, factory, masks) for e in range(shown))))
        else:
            with borrowed_rng():  # the caller's generators, given back once
                columns = _per_sample(checked, stored, indices, shown, factory)
        if masks is not None:
            originals = [overlay(image, mask) for image, mask in zip(originals, masks)]
    else:
        originals = _original(root, m, indices, source, say)
        by_epoch = [_shard_positions(indexed[e], set(indices)) for e in range(shown)]
        columns = [[read_image(root, *by_epoch[e][i], m["image"]) for e in range(shown)] for i in indices]
        if checked.mask is not None:  # each stored image with its stored mask drawn over it
            columns = [[overlay(image, read_mask(root, *by_epoch[e][i], checked.mask)) for e, image in enumerate(row)]
                       for i, row in zip(indices, columns)]
    h, w, c = m["output_shape"]
    c = 3 if checked.mask is not None else c  # masks are drawn in colour
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
            if m.mask is not None:  # each sample with its mask, moved together and drawn over it
                column = [overlay(*augment_pair(transform, stored.load(i), stored.load_mask(i), seed=m.seed, epoch=e,
                                                index=i)) for i in indices]
            else:
                column = [augment(transform, stored.load(i), seed=m.seed, epoch=e, index=i) for i in indices]
        except FormatError:  # ours, already one line (the output is not an image)
            raise
        except Exception as err:
            raise CachegenError(f"transform {t['spec']} failed in preview: {type(err).__name__}: {err}") from None
        if any(out.shape[:2] != m.output_shape[:2] for out in column):
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


def _batched(m: Manifest, epoch: int, images: list[np.ndarray], factory: CacheFactory | None,
             masks: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """`images` (HWC uint8) augmented as one batch with the cache's batched augmentation of `epoch`
    (with `masks`, moved with them and drawn over them)."""
    t = m.raw["transform"]
    if masks is not None:
        pair = make_batched_pair(t["spec"], epoch=epoch, epochs=m.num_epochs, size=t["size"], channels=m.shape[2],
                                 schedule=t["schedule"], factory=factory)
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
        h, w, c = m.output_shape
        out, out_masks = augment_batch_pair(pair, batch, torch.from_numpy(np.stack(masks)),
                                            seed=batch_seed(m.seed, epoch, 0), name=t["spec"], shape=(c, h, w))
        pixels = out.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [overlay(p, mask) for p, mask in zip(pixels, out_masks.numpy())]
    batched = make_batched(t["spec"], epoch=epoch, epochs=m.num_epochs, size=t["size"], channels=m.shape[2],
                           schedule=t["schedule"], factory=factory)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    h, w, c = m.output_shape
    out = augment_batch(batched, batch, seed=batch_seed(m.seed, epoch, 0), name=t["spec"], shape=(c, h, w))
    return list(out.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def _chw(image: np.ndarray, channels: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, as torch wants
    return t.expand(channels, -1, -1) if t.shape[0] == 1 and channels > 1 else t
