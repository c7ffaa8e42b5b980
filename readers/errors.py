"""The one exception type the readers raise for problems the user can fix."""

from cacheformat import FormatError


class ReaderError(FormatError):
    """An expected failure: no cache, a missing or damaged shard, options that cannot work.

    The message is one line naming the file or the numbers at fault and what to do.
    """
