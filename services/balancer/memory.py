"""One memory budget for the balancer process: request and answer bytes in flight.

Every byte the balancer holds on behalf of a client or a backend is charged here as it
arrives and given back when it is no longer held: request bodies (`http_server.py`, from
the first byte to the answer), answer bodies read from backends (`upstream.py`, while the
try reads them), and answers waiting in a client's write buffer because it does not read
them (`http_server.py`, until they drain). A charge that would pass the limit is refused,
and the request or try that asked for it fails with a 503 that says so: the process stops
growing instead of growing until the kernel kills it.

A charge that may be refused is `take`; bytes already held (a write buffer, input read
ahead) are charged with `force`; what is given back is subtracted from `used`. A body
larger than `SMALL_BODY_BYTES` may use only seven eighths of the budget: the last eighth
stays for the small requests and answers that are nearly all the traffic, so a flood of
large answers is refused before it can starve them. A body whose size is not known (a
request without a length) counts as large however far it has come: two hundred chunked
uploads, each small so far, would otherwise fill the last eighth too; so does the input
read ahead in the middle of such a body (`http_server.py` holds it while other
connections have their turn).

Freed memory does not by itself go back to the system: glibc's allocator keeps freed
heap pages, and raises its mmap threshold after each large block is freed, so later large
blocks come from the heap too. `PageReturner` pins that threshold (large buffers are then
mapped and unmapped as a whole) and, once a load has passed, asks glibc to return the
free pages of its heaps (`malloc_trim`), on a worker thread (the call releases the GIL).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger("twlb.balancer")

#: glibc's mallopt parameter number of the mmap threshold (malloc.h, M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3

#: Blocks at least this large are mapped on their own and unmapped when freed.
MMAP_THRESHOLD = 256 * 1024

#: Bodies up to this size may use the whole budget; larger ones seven eighths of it.
SMALL_BODY_BYTES = 64 * 1024


def known_small(body: int | None) -> bool:
    """Whether a body of `body` bytes (None: its size is not known) is one the whole
    budget is open to."""
    return body is not None and body <= SMALL_BODY_BYTES


class MemoryBudget:
    """Bytes in flight against one limit; `high` is the most held since `high` was reset."""

    __slots__ = ("limit", "large_limit", "used", "high", "refused")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a memory budget must be positive, got {limit}")
        self.limit = limit
        self.large_limit = limit - limit // 8  # what bodies over SMALL_BODY_BYTES may use
        self.used = 0
        self.high = 0
        self.refused = 0  # charges refused since start

    def take(self, n: int, body: int | None) -> bool:
        """Charge `n` bytes of a body that is then `body` bytes (None: a body whose size
        is not known, counted as a large one), if they fit; False (and nothing charged)
        if they do not."""
        used = self.used + n
        if used > (self.limit if known_small(body) else self.large_limit):
            self.refused += 1
            return False
        self.used = used
        if used > self.high:
            self.high = used
        return True

    def force(self, n: int) -> None:
        """Charge `n` bytes already held (an answer the client has not read yet)."""
        self.used += n
        if self.used > self.high:
            self.high = self.used

    def give(self, n: int) -> None:
        """Give back `n` bytes charged earlier."""
        self.used -= n

    def refusal(self) -> str:
        """Why a request or try was refused, for its 503."""
        return (
            f"the balancer's memory budget is spent ({self.used} of {self.limit} bytes of "
            "requests and answers in flight); try again shortly"
        )


def grow(held: bytes | bytearray, piece: bytes) -> bytes | bytearray:
    """A body as it arrives: its first piece as it is, then one growing buffer (never an
    object per piece: a body sent in 2-byte chunks would cost 28 times its size)."""
    if not held:
        return piece
    if type(held) is bytes:
        return bytearray(held) + piece
    held += piece  # type: ignore[operator]
    return held


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has malloc_trim and mallopt), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    return libc


class PageReturner:
    """Gives freed memory back to the system once a load has passed (glibc only).

    `poll()` is called once a second with the budget: when the bytes in flight have risen
    above `after_bytes` since the last return and have fallen back below an eighth of that,
    the free pages of glibc's heaps are returned on a worker thread.
    """

    def __init__(self, budget: MemoryBudget, after_bytes: int = 32 << 20) -> None:
        self.budget = budget
        self.after_bytes = after_bytes
        self.libc = _glibc()
        self.returns = 0
        self._task: asyncio.Future[None] | None = None
        if self.libc is not None:
            # Pinned, the threshold no longer rises after each large free, so a large body
            # is always a mapping of its own and goes back to the system when freed.
            self.libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        else:
            log.info("not glibc: freed memory is left to the allocator's own policy")

    def poll(self, loop: asyncio.AbstractEventLoop) -> None:
        budget = self.budget
        if (
            self.libc is None
            or (self._task is not None and not self._task.done())
            or budget.high < self.after_bytes
            or budget.used * 8 > budget.high
        ):
            return
        budget.high = budget.used
        self.returns += 1
        self._task = loop.run_in_executor(None, self.libc.malloc_trim, 0)
