"""The one exception type cachegen raises for problems the user can fix."""

from cacheformat import FormatError


class CachegenError(FormatError):
    """An expected failure: bad input, a conflicting cache, a full disk.

    The message is one line saying what is wrong and what to do; the CLI prints it (and any
    FormatError: a damaged cache) without a traceback and exits non-zero.
    """
