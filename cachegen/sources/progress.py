"""A bar for the work a source does when it is opened (reading shard headers, a Dataset's labels), which
comes before the build's own bar: shown only where it takes more than a moment."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
DELAY_S = 2.0  # an index that takes less shows no bar


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread left running once the source is open


def opening(items: Iterable[T], *, total: int, desc: str, quiet: bool) -> Iterator[T]:
    """`items`, with a bar on stderr after DELAY_S seconds, unless `quiet` (or stderr is no terminal)."""
    with _Bar(items, total=total, desc=desc, unit="", delay=DELAY_S, disable=True if quiet else None,
              dynamic_ncols=True, leave=False) as bar:
        yield from bar
