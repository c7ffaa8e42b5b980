"""The one exception type cachegen raises for problems the user can fix."""

import re


class CachegenError(Exception):
    """An expected failure: bad input, a conflicting cache, a full disk.

    The message is one line saying what is wrong and what to do; the CLI prints it
    without a traceback and exits non-zero.
    """

    def __init__(self, message: str) -> None:
        # One line even where it quotes another error's text (an import error, a user's factory).
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())
