"""cacheformat: the contract between the builder (`cachegen`) and the readers (`readers`).

What a cache folder holds and how to check it: the manifest's schema (`manifest`, its tables
walked by `schema`), the per-shard index files (`index`), where every sample of every epoch goes
(`layout`), the per-sample seeding rule (`seeding`) and the error both sides raise for a cache
that breaks the format (`FormatError`; `as_error` re-raises it as either side's own).
docs/FORMAT.md describes it in words. Needs numpy, not torch; imports nothing of either side.
"""

from cacheformat.errors import FormatError, as_error

__all__ = ["FormatError", "as_error"]
