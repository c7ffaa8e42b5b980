"""The exception the contract raises for a cache that breaks the format."""

import re


class FormatError(Exception):
    """A cache that breaks the format: a missing, damaged or hand-edited manifest, index or shard.

    The message is one line naming the file and what to do. `cachegen.CachegenError` and
    `readers.ReaderError` derive from it, so either side can catch both.
    """

    def __init__(self, message: str) -> None:
        # One line even where it quotes another error's text.
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())
