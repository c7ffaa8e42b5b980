"""Which share of the data this process reads: rank and world size, by default from torch.distributed.

They are resolved when a loader starts a pass (and for len()), not when it is built: a loader made
before `init_process_group` (as Lightning's DDP strategy, Accelerate or torchrun scripts often do)
still reads only its rank's share.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from readers.errors import ReaderError


def check_split(rank: int | None, world_size: int | None) -> None:
    """Check explicit values now (types, ranges); None is resolved later by resolve_rank.

    Raises:
        ValueError: a value that is not an int, or a split outside 0 <= rank < world_size.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid split: need 0 <= rank < world_size")
    if rank is not None and (rank < 0 or (world_size is not None and rank >= world_size)):
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid split: need 0 <= rank < world_size")


def resolve_rank(rank: int | None = None, world_size: int | None = None, *, strict: bool = True) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when it is initialised,
    else (0, 1).

    With `strict`, a WORLD_SIZE > 1 in the environment (torchrun, Lightning, Accelerate set it)
    without an initialised process group is an error rather than a silent (0, 1): every rank
    would read the whole epoch.

    Raises:
        ValueError: a value out of range, or only one of the two given outside torch.distributed.
        ReaderError: (strict) WORLD_SIZE > 1 but no process group.
    """
    check_split(rank, world_size)
    initialised = dist.is_available() and dist.is_initialized()
    if strict and not initialised and rank is None and world_size is None:
        env = os.environ.get("WORLD_SIZE", "")
        if env.strip().isdigit() and int(env) > 1:
            raise ReaderError(f"WORLD_SIZE={env} in the environment but torch.distributed has no process group "
                              "when the loader started: call torch.distributed.init_process_group first, or pass "
                              "rank= and world_size=")
    if rank is None:
        if world_size is not None and not initialised:
            raise ValueError(f"world_size={world_size!r} was given without rank (and torch.distributed "
                             "is not initialised): give both")
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        if not initialised:
            if rank != 0:
                raise ValueError(f"rank={rank!r} was given without world_size (and torch.distributed "
                                 "is not initialised): give both")
            world_size = 1
        else:
            world_size = dist.get_world_size()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid split: need 0 <= rank < world_size")
    return rank, world_size
