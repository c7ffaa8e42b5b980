"""LoaderOptions: the options every loader shares, checked once, up front."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from readers.device import DTYPES, check_device
from readers.split import check_split


@dataclass(frozen=True)
class LoaderOptions:
    """Batching, order, device and distributed options; see CachedLoader for what each means.

    `device` is checked on construction (None: cuda if available); an index-less cuda is bound
    to a GPU when a pass starts (readers.device.resolve_device: LOCAL_RANK's, or the current
    one). `prefetch` is resolved now (a prefetch thread on CUDA only). `rank` and `world_size`
    are checked now but kept as given: None is resolved when a pass starts
    (readers.split.resolve_rank), so a loader built before `init_process_group` still splits. `mean`/`std` (None: the manifest's) are checked to be
    finite numbers with std > 0 here, and against the cache's channels by the loader.
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
    mean: Sequence[float] | None = None  # per channel, [0, 1] units; None: the manifest's
    std: Sequence[float] | None = None

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
        check_split(self.rank, self.world_size)
        object.__setattr__(self, "mean", _check_stats("mean", self.mean, None))
        object.__setattr__(self, "std", _check_stats("std", self.std, 0.0))
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean {list(self.mean)!r} and std {list(self.std)!r} must have one value per channel each")
        object.__setattr__(self, "device", check_device(self.device))
        if self.prefetch is None:
            # A reader thread pays off when the consumer mostly waits on a GPU; on the CPU it
            # competes with the consumer for the same cores and the GIL, and measures slower.
            object.__setattr__(self, "prefetch", 2 if self.device.type == "cuda" else 0)


_Init = TypeVar("_Init", bound=Callable)


def passes_options_to(base_init: Callable) -> Callable[[_Init], _Init]:
    """Decorator for a loader's `__init__(self, cache, *, batch_size, <its own options>, **options)`
    that hands `**options` to `base_init` (Loader.__init__): the shared options are written once,
    there, and this __init__'s signature (help(), inspect.signature) lists them with their
    defaults as if written out, then base_init's `**staging`."""

    def decorate(init: _Init) -> _Init:
        signature = inspect.signature(init)
        own, base = signature.parameters, inspect.signature(base_init).parameters
        positional = [p for p in own.values() if p.kind is p.POSITIONAL_OR_KEYWORD]  # self, cache
        shared = [own.get(name, p) for name, p in base.items() if p.kind is p.KEYWORD_ONLY]
        extra = [p for name, p in own.items() if p.kind is p.KEYWORD_ONLY and name not in base]
        staging = [p for p in base.values() if p.kind is p.VAR_KEYWORD]
        init.__signature__ = signature.replace(parameters=[*positional, *shared, *extra, *staging])
        return init

    return decorate


def _check_stats(name: str, values: object, above: float | None) -> tuple[float, ...] | None:
    """None, or a non-empty sequence of finite numbers (each > `above` if given), as a tuple of floats."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        values = values.tolist()
    if (isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise ValueError(f"{name} must be one finite number per channel, got {values!r}")
    if above is not None and any(v <= above for v in values):
        raise ValueError(f"{name} must be > {above:g} for every channel, got {list(values)!r}")
    return tuple(float(v) for v in values)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
