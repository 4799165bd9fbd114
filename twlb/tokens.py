"""Bearer tokens that stay off the command line: from a value (an environment variable)
or from a file that is re-read when it changes (a mounted Kubernetes Secret, or the
`twlb up` state directory's files, mode 0600).

A token given as a flag is visible in the process list to every local user; a file or an
environment variable is not (only the process's owner reads /proc/PID/environ).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class TokenError(ValueError):
    """A token file that cannot be read or holds no token; the message names the file."""


def read_token_file(path: Path) -> str:
    """The token in `path` (surrounding whitespace dropped); TokenError when unreadable
    or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TokenError(f"{path}: cannot read the token: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TokenError(f"{path}: the token file is not UTF-8 text") from None
    token = text.strip()
    if not token:
        raise TokenError(f"{path}: the token file is empty")
    return token


class Token:
    """A bearer token from a value or a file; `value` re-reads the file after it changed
    (a rotated Secret takes effect without a restart), keeping the last good token when
    the new file cannot be read."""

    __slots__ = ("path", "_value", "_mtime")

    def __init__(self, value: str | None = None, path: Path | None = None) -> None:
        self.path = path
        self._value = value or None
        self._mtime: int | None = None
        if path is not None:
            self._value = read_token_file(path)  # TokenError at start names the file
            self._mtime = os.stat(path).st_mtime_ns

    @property
    def value(self) -> str | None:
        path = self.path
        if path is not None:
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                return self._value
            if mtime != self._mtime:
                try:
                    self._value = read_token_file(path)
                    self._mtime = mtime
                except TokenError:
                    pass  # a file being rewritten: the last good token stays
        return self._value

    def matches(self, offered: str) -> bool:
        """Whether `offered` is the token (compared in constant time)."""
        token = self.value
        return token is not None and secrets.compare_digest(offered.encode(), token.encode())


def write_token_file(path: Path, token: str) -> Path:
    """Write `token` to `path`, readable by its owner only (mode 0600 from creation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path
