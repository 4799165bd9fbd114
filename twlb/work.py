"""The work contract (docs/DESIGN.md): an iterated SHA-256 digest of a key.

Backends compute it, the client recomputes it to verify every answer; the balancer
never does (a real balancer cannot verify real work).
"""

from __future__ import annotations

import hashlib

KEY_MIN_LEN = 1
KEY_MAX_LEN = 256
ROUNDS_MIN = 1
ROUNDS_MAX = 10_000


def digest(key: str, rounds: int = 1) -> str:
    """Return lowercase hex of sha256 applied `rounds` times, starting from the key's UTF-8."""
    if not ROUNDS_MIN <= rounds <= ROUNDS_MAX:
        raise ValueError(f"rounds must be in {ROUNDS_MIN}..{ROUNDS_MAX}, got {rounds}")
    d = hashlib.sha256(key.encode("utf-8")).digest()
    for _ in range(rounds - 1):
        d = hashlib.sha256(d).digest()
    return d.hex()


def key_problem(key: str) -> str | None:
    """Why `key` is not a valid work key, or None when it is (1..256 printable chars)."""
    if not KEY_MIN_LEN <= len(key) <= KEY_MAX_LEN:
        return f"key must be {KEY_MIN_LEN}..{KEY_MAX_LEN} characters, got {len(key)}"
    if not key.isprintable():
        return "key must contain only printable characters"
    return None
