"""LoaderOptions: the options every loader shares, checked once, up front."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from readers.device import DTYPES, resolve_device
from readers.split import resolve_rank


@dataclass(frozen=True)
class LoaderOptions:
    """Batching, order, device and distributed options; see CachedLoader for what each means.

    `device`, `rank`, `world_size` and `prefetch` are resolved on construction (None: cuda if
    available; torch.distributed's rank and world size when it is initialised; a prefetch
    thread on CUDA only).
    """

    batch_size: int
    device: torch.device | str | None = None
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    normalize: bool = True
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    rank: int | None = None
    world_size: int | None = None
    prefetch: int | None = None  # None: 2 on CUDA, 0 on the CPU

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        if self.prefetch is not None:
            _check_int("prefetch", self.prefetch, 0)
        for name in ("shuffle", "drop_last", "normalize", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(map(str, DTYPES))}")
        rank, world_size = resolve_rank(self.rank, self.world_size)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.prefetch is None:
            # A reader thread pays off when the consumer mostly waits on a GPU; on the CPU it
            # competes with the consumer for the same cores and the GIL, and measures slower.
            object.__setattr__(self, "prefetch", 2 if self.device.type == "cuda" else 0)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
