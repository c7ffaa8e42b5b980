"""The exception the contract raises for a cache that breaks the format."""

import re
from collections.abc import Callable
from contextlib import ContextDecorator


class FormatError(Exception):
    """A cache that breaks the format: a missing, damaged or hand-edited manifest, index or shard.

    The message is one line naming the file and what to do. `cachegen.CachegenError` and
    `readers.ReaderError` derive from it, so either side can catch both.
    """

    def __init__(self, message: str) -> None:
        # One line even where it quotes another error's text.
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


class as_error(ContextDecorator):  # noqa: N801 - used as `with as_error(...)` / `@as_error(...)`, like a function
    """Re-raise a FormatError raised inside as `kind` (one of each side's own error types, or
    click's), with its text: one line, without the FormatError's traceback. `reword(text)`, where
    given, says it in the caller's words; `kind` None keeps the error's own type."""

    def __init__(self, kind: type[Exception] | None, reword: Callable[[str], str] | None = None) -> None:
        self.kind, self.reword = kind, reword

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type, error, _traceback) -> bool:
        if isinstance(error, FormatError):
            text = self.reword(str(error)) if self.reword else str(error)
            raise (self.kind or type(error))(text) from None
        return False
