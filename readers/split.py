"""Which share of the data (and of the machine) this process has: rank and world size, by default from
torch.distributed; the cores per local rank.

They are resolved when a loader starts a pass (and for len()), not when it is built: a loader made
before `init_process_group` (as Lightning's DDP strategy, Accelerate or torchrun scripts often do)
still reads only its rank's share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


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
    import torch.distributed as dist  # here, not at import: the build's CLI takes default_workers without torch

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


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes sharing this machine: LOCAL_WORLD_SIZE (torchrun, Lightning and Accelerate set
    it) where it is a positive int, else 1."""
    value = (os.environ if env is None else env).get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(share: float = 1.0, *, cores: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Worker processes a loader or a build starts by default: `share` of this process's part of
    the cores, which are split evenly between the LOCAL_WORLD_SIZE ranks of the machine (8 ranks
    on 96 cores: 12 each, not 96 each). At least 1.

    `cores` (None: available_cores()) and `env` (None: os.environ) are what a test passes.
    """
    cores = available_cores() if cores is None else cores
    return max(1, int(share * max(1, cores // local_world_size(env))))
