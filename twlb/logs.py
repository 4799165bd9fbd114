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
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import orjson
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
        ready = record.__dict__.get(FIELDS)
        if ready is not None and not record.exc_info:
            # One line a request: the fields as they are, quoted only when they must be.
            parts = [
                f"{_text_time(record.created)} {record.levelname} {record.name}: "
                f"{record.getMessage()}"
            ]
            for key, value in ready.items():
                if isinstance(value, Mapping):
                    _flat(key, value, parts)
                    continue
                text = "-" if value is None else str(value)
                if " " in text or '"' in text or not text:
                    text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
                parts.append(f"{key}={text}")
            return " ".join(parts)
        line = super().format(record)
        extra = fields_of(record)
        if not extra:
            return line
        parts: list[str] = []
        for key, value in extra.items():
            _flat(key, value, parts)
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(parts)}{sep}{tail}"


#: The attribute of a record whose value is all its fields, ready (access log lines: one
#: line a request, so they skip the formatters' search of the record for fields).
FIELDS = "fields"


class JsonFormatter(OrjsonFormatter):
    """python-json-logger's formatter (orjson): time, level, logger, message and the
    record's fields as members. A record that carries its fields ready in one dict
    (`extra={FIELDS: {...}}`) is written from that dict."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        )

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get(FIELDS)
        if fields is None or record.exc_info:
            return super().format(record)
        line = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields,
            "time": iso_utc(record.created),
        }
        return orjson.dumps(line, default=str).decode()


def iso_utc(wall: float, zone: str = "+00:00") -> str:
    """A wall-clock time as ISO 8601 in UTC, to the microsecond, ending with `zone` (the
    second's text cached: a log or access line each time)."""
    second = int(wall)
    if second != _second[0]:
        _second[0] = second
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((wall - second) * 1e6):06d}{zone}"


_second: list = [-1, ""]


def _text_time(created: float) -> str:
    """A record's time as the text format writes it (logging's default, local time)."""
    second = int(created)
    if second != _local[0]:
        _local[0] = second
        _local[1] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
    return f"{_local[1]},{int((created - second) * 1000):03d}"


_local: list = [-1, ""]


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time, level, logger, message, and every field given."""
    return JsonFormatter()


def formatter(fmt: str | None) -> logging.Formatter:
    return json_formatter() if (fmt or default_format()) == "json" else TextFormatter()


def setup_logging(
    level: str | int = "info", fmt: str | None = None, stream: TextIO | None = None
) -> None:
    """Log at `level` to `stream` (stderr) in `fmt` (None: `default_format()`), replacing
    the root logger's handlers."""
    # The logging HOWTO's optimizations: no caller, thread or process lookups per record
    # (no format here shows them), which cost more than the rest of an access line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
