"""A reinforced cache's teacher targets: read from each shard once it is mapped, and scattered
into dense (B, classes) probabilities per batch (cacheformat.teacher has the stored layout).

Nothing here runs the teacher: a reader only reads the numbers the build stored, each checked
(the member's header, every class index, every probability) before a batch is made of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cacheformat.teacher import decode_records, header, member_starts
from readers.errors import ReaderError
from readers.manifest import Manifest, Shard, ShardIndex

TARGETS = ("labels", "teacher", "mask")
REBUILD = "re-run the same `cachegen build` to rebuild it"


@dataclass(frozen=True, eq=False)
class ShardTargets:
    """The teacher's top-K of every sample of one shard, in shard order."""

    classes: torch.Tensor  # int64 (samples, K)
    probs: torch.Tensor  # float32 (samples, K)


def check_targets(targets: str, manifest: Manifest) -> None:
    """ValueError for an unknown `targets`; ReaderError where the cache has no teacher targets to give."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(map(repr, TARGETS))}, got {targets!r}")
    if targets == "mask" and manifest.mask is None:
        raise ReaderError(f"{manifest.root} has no masks: build it from a source with masks (a .npz with 'masks', "
                          "a folder with --masks DIR, --sample-masks), or read it with targets='labels'")
    if targets == "teacher" and manifest.teacher is None:
        raise ReaderError(f"{manifest.root} has no teacher targets: build it with `cachegen build --teacher "
                          "FILE.py:factory` (a reinforced cache), or read it with targets='labels'")


def read_targets(manifest: Manifest, shard: Shard, data: np.ndarray, index: ShardIndex) -> ShardTargets:
    """The teacher members of a mapped shard (`data`, its bytes), checked. Where they sit follows
    from the index (already checked to keep every member inside the shard)."""
    spec = manifest.teacher
    n = shard.samples
    starts = member_starts(index.offsets, index.sizes)
    expected = np.frombuffer(header(spec.topk), np.uint8)
    found = data[starts[:, None] + np.arange(len(expected))] if n else np.zeros((0, len(expected)), np.uint8)
    bad = np.flatnonzero((found != expected).any(axis=1))
    if len(bad):
        raise ReaderError(f"shard {shard.path}: no teacher member of {spec.topk} records after sample {int(bad[0])}'s "
                          f"image; the file does not match the manifest: {REBUILD}")
    records = data[starts[:, None] + len(expected) + np.arange(spec.record_bytes)] if n else \
        np.zeros((0, spec.record_bytes), np.uint8)
    try:
        classes, probs = decode_records(records, spec, f"shard {shard.path}")
    except ValueError as e:
        raise ReaderError(f"{e}: the shard is damaged; {REBUILD}") from None
    return ShardTargets(classes=torch.from_numpy(classes), probs=torch.from_numpy(probs))


def scatter_targets(out: torch.Tensor, targets: ShardTargets, rows: torch.Tensor) -> None:
    """Write the dense teacher probabilities of shard rows `rows` into `out` (len(rows), classes),
    zero where the teacher's top-K did not reach."""
    out.zero_()
    out.scatter_(1, targets.classes.index_select(0, rows), targets.probs.index_select(0, rows))
