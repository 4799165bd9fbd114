"""How every `twlb` process writes its log: text lines or one JSON object a line.

`setup_logging(level, fmt)` puts one handler on the root logger. Text lines read
`<wall-clock time> <LEVEL> <logger>: <message> key=value ...`, the record's structured
fields (`extra=`) after the message; JSON lines (python-json-logger) carry the same
fields as members: `time` (ISO 8601, UTC), `level`, `logger`, `message` and every field
given. Structured data is passed as fields, never pasted into the message as JSON.

The format comes from the process's own `--log-format`, else from `twlb --log-format`
(`TWLB_LOG_FORMAT`, which the processes `twlb up` starts inherit), else text.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = ("text", "json")
#: The environment variable every process reads its default format from.
FORMAT_VARIABLE = "TWLB_LOG_FORMAT"

#: Attributes every LogRecord has: not fields of the caller's.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def default_format() -> LogFormat:
    """The format a process uses unless told otherwise (TWLB_LOG_FORMAT, else text)."""
    value = os.environ.get(FORMAT_VARIABLE, "text").strip().lower()
    return "json" if value == "json" else "text"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller gave a record (`extra=`)."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}


def _flat(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
        return
    text = "-" if value is None else str(value)
    if not text or any(c.isspace() or c == '"' for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    out.append(f"{prefix}={text}")


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` (nested fields as `key.sub=value`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields_of(record)
        if not extra:
            return line
        parts: list[str] = []
        for key, value in extra.items():
            _flat(key, value, parts)
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(parts)}{sep}{tail}"


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time, level, logger, message, and every field given."""
    return OrjsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def formatter(fmt: str | None) -> logging.Formatter:
    return json_formatter() if (fmt or default_format()) == "json" else TextFormatter()


def setup_logging(
    level: str | int = "info", fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Log at `level` to `stream` (stderr) in `fmt` (None: `default_format()`), replacing
    the root logger's handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
