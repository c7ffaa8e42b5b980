"""The per-sample seeding rule: which seed augments sample `index` of epoch `epoch`."""

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` of epoch `epoch` in a build with `seed`: a SplitMix64 hash, cheap
    and well mixed, below 2**63 (torch seeds must fit in a signed 64-bit int)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1
