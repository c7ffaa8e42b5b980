"""Which share of the data this process reads: rank and world size, by default from torch.distributed."""

from __future__ import annotations

import torch.distributed as dist


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when it is initialised,
    else (0, 1).

    Raises:
        ValueError: a value out of range, or only one of the two given outside torch.distributed.
    """
    initialised = dist.is_available() and dist.is_initialized()
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
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size} is not a valid split: need 0 <= rank < world_size")
    return rank, world_size
