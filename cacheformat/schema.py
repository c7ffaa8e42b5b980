"""A small declarative schema for JSON read from disk, and the one walker that checks it.

A `Section` is a table of `Field`s: a key, the test its value must pass (type, range, allowed
values), what to say where it does not, and whether it is required. A field may hold a section, or
a list of them, walked in turn. What relates two fields (counts against sizes, lengths against
other fields) is not a field's business: the caller checks it after the walk, on values the walk
has already typed. Messages are templates (`str.format_map`) over the section's fields, plus
`manifest` (the whole document) and `i` (an entry's place in its list), or functions of that
mapping where a template cannot say it.

Every value is untrusted. A required field that is missing raises the KeyError that reading it
raises, and a section that is not an object the TypeError subscripting it raises: the caller turns
those into its one-line error, as it does for any other malformed field.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REQUIRED = object()  # a Field's default: absent is an error (the KeyError of reading it)
SKIP = object()  # a Field's default: absent is fine and nothing is checked

Message = str | Callable[[Mapping], str]


@dataclass(frozen=True)
class Field:
    """One entry of a section. `key` a name, or a tuple of names into nested objects (required).

    `default`: REQUIRED, SKIP, or the value an absent field is checked as. `inner`: the section
    its value holds (an optional one is not walked when None); `each`: the section every item of
    its value is.
    """

    key: str | tuple[str, ...]
    ok: Callable[[Any], bool]
    what: Message
    default: Any = REQUIRED
    inner: Section | None = None
    each: Section | None = None


@dataclass(frozen=True)
class Section:
    """A table of fields; `ok(section, i)` (with `what`) first checks the entry as a whole."""

    fields: tuple[Field, ...]
    ok: Callable[[Any, int | None], bool] | None = None
    what: Message = ""


def walk(schema: Section, section: Any, fail: Callable[[str], Exception], document: Any = None,
         i: int | None = None) -> None:
    """Check `section` against `schema`, depth first, in table order; raise `fail(message)` for
    the first field that breaks it (`document`: the whole, for messages, by default `section`; `i`:
    the section's place in its list)."""
    document = section if document is None else document
    if schema.ok is not None and not schema.ok(section, i):
        raise fail(say(schema.what, section, schema, document, i))
    for field in schema.fields:
        default = field.default
        if default is REQUIRED or not isinstance(section, dict):
            key = field.key  # a plain key inline: the walk runs once per shard of a million-shard manifest
            value = section[key] if key.__class__ is str else _lookup(section, key)
        elif field.key in section:
            value = section[field.key]
        elif default is SKIP:
            continue
        else:
            value = default
        if not field.ok(value):
            raise fail(say(field.what, section, schema, document, i))
        if field.inner is not None and (value is not None or default is REQUIRED):
            walk(field.inner, value, fail, document)
        if field.each is not None:
            for j, item in enumerate(value):
                walk(field.each, item, fail, document, j)


def say(what: Message, section: Any, schema: Section, document: Any, i: int | None = None) -> str:
    """`what` said of `section`: its fields (an absent optional one as its default), `manifest`, `i`."""
    defaults = {f.key: f.default for f in schema.fields if f.default not in (REQUIRED, SKIP)}
    names = ChainMap({"manifest": document, "i": i}, section if isinstance(section, dict) else {}, defaults)
    return what(names) if callable(what) else what.format_map(names)


def _lookup(section: Any, key: str | tuple[str, ...]) -> Any:
    if isinstance(key, str):
        return section[key]
    for name in key:
        section = section[name]
    return section
