"""Reading the EDN that Jepsen histories are written in, fast.

`edn_format` reads all of EDN, at about half a millisecond a line: a 100,000-operation
Jepsen history would take two minutes to read. Jepsen's lines are flat maps of keywords,
integers, strings, nil and small vectors, so those are read here with one regular
expression (about 50 times faster); any line using more of EDN (tags, sets, characters,
symbols, ratios, big numbers) is handed to `edn_format` whole. Both give the same plain
Python values: keywords as their names, vectors and lists as tuples, maps as dicts.
"""

from __future__ import annotations

import json
import re
from typing import Any

import edn_format
from edn_format import ImmutableDict, ImmutableList, Keyword


class EdnError(ValueError):
    """Text that is not the EDN expected."""


_TOKEN = re.compile(
    r"""[\s,]*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
     |(?P<kw>:[A-Za-z*+!_?<>=.\-][\w*+!?<>=.\-/:#]*)
     |(?P<open>[\[{(])
     |(?P<close>[\]})])
     |(?P<num>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=[\s,\[\]{}()]|$)
     |(?P<word>nil|true|false)(?=[\s,\[\]{}()]|$)
     |(?P<end>$)
    )""",
    re.X | re.S,
)
_CLOSE = {"[": "]", "{": "}", "(": ")"}
_WORDS = {"nil": None, "true": True, "false": False}


class Kw(str):
    """A keyword's name: equal to the plain string, but known to have been a keyword
    (Jepsen's `:nemesis` process is a keyword; a string there is an error)."""

    __slots__ = ()


class _Fallback(Exception):
    """The text uses EDN beyond the fast subset."""


def _read(text: str, pos: int) -> tuple[Any, int]:
    m = _TOKEN.match(text, pos)
    if m is None or m.lastgroup in (None, "end", "close"):
        raise _Fallback
    kind, token, pos = m.lastgroup, m.group(m.lastgroup), m.end()
    if kind == "str":
        return (json.loads(token, strict=False) if "\\" in token else token[1:-1]), pos
    if kind == "kw":
        return Kw(token[1:]), pos
    if kind == "num":
        return (float(token) if "." in token or "e" in token or "E" in token else int(token)), pos
    if kind == "word":
        return _WORDS[token], pos
    items = []
    close = _CLOSE[token]
    while True:
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup == "end":
            raise _Fallback
        if m.lastgroup == "close":
            if m.group("close") != close:
                raise _Fallback
            pos = m.end()
            break
        item, pos = _read(text, pos)
        items.append(item)
    if token == "{":
        if len(items) % 2:
            raise _Fallback
        out = {}
        for k, v in zip(items[::2], items[1::2], strict=True):
            if isinstance(k, list | dict):
                raise _Fallback
            out[k] = v
        return out, pos
    return tuple(items), pos


def plain(value: Any) -> Any:
    """An `edn_format` value as the plain values `read` gives."""
    if isinstance(value, Keyword):
        return Kw(value.name)
    if isinstance(value, ImmutableDict | dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | ImmutableList):
        return tuple(plain(v) for v in value)
    return value


def read(text: str) -> Any:
    """One EDN value filling `text` (surrounding whitespace and commas allowed)."""
    try:
        value, pos = _read(text, 0)
        if _TOKEN.match(text, pos).lastgroup == "end":
            return value
    except (_Fallback, ValueError):
        pass
    try:
        return plain(edn_format.loads(text))
    except Exception as err:  # edn_format raises its own errors and ply's
        raise EdnError(f"not EDN: {err}") from None


def read_prefix(text: str) -> tuple[Any, str]:
    """The first EDN value at the start of `text` and the text after it (for log lines
    whose value is followed by more columns). Only the fast subset, or one whitespace-
    separated word read by `edn_format`."""
    try:
        value, pos = _read(text, 0)
        return value, text[pos:]
    except (_Fallback, ValueError):
        head, *rest = re.split(r"[\s,]+", text.strip(), maxsplit=1)
        return read(head), rest[0] if rest else ""


__all__ = ["EdnError", "Kw", "plain", "read", "read_prefix"]
