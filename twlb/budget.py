"""A retry budget (sans-IO): retries may be at most a ratio of recent live traffic.

Finagle's and Linkerd's model: every request deposits `ratio` of a token, every retry
withdraws one, deposits expire after `ttl_s`, and `min_per_s` retries per second are
always allowed so a quiet service can still retry. Used by the balancer and the client.

Deposits and withdrawals are counted in `SLOTS` time slots per `ttl_s` (as Finagle's
windowed adder), so memory stays bounded whatever the request rate, and recording one
costs O(1); a deposit expires within ttl_s / SLOTS of its exact time.
"""

from __future__ import annotations

import math
from collections import deque

#: Time slots per window; a slot holds a count, not one entry per request.
SLOTS = 20


class _SlotCounts:
    """Events per time slot over the last `ttl_s`."""

    __slots__ = ("_slots", "_width", "_ttl", "total")

    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._width = ttl_s / SLOTS
        self._slots: deque[list[int]] = deque()  # [slot index, count], oldest first
        self.total = 0

    def add(self, now: float) -> None:
        index = math.floor(now / self._width)
        slots = self._slots
        if slots and slots[-1][0] >= index:
            slots[-1][1] += 1  # the newest slot (a late event lands there too)
        else:
            slots.append([index, 1])
            self.expire(now)
        self.total += 1

    def expire(self, now: float) -> None:
        # A slot expires once all of it is older than ttl_s.
        oldest = math.floor((now - self._ttl) / self._width)
        slots = self._slots
        while slots and slots[0][0] < oldest:
            self.total -= slots.popleft()[1]


class RetryBudget:
    """Bounded retries as a share of live traffic over a sliding window; no clock of its own."""

    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0, ttl_s: float = 10.0) -> None:
        if not 0.0 <= ratio <= 1000.0:
            raise ValueError(f"ratio must be in 0..1000, got {ratio}")
        if min_per_s < 0 or ttl_s <= 0:
            raise ValueError("min_per_s must be >= 0 and ttl_s > 0")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.ttl_s = ttl_s
        self._requests = _SlotCounts(ttl_s)
        self._retries = _SlotCounts(ttl_s)
        self.withdrawn_total = 0
        self.refused_total = 0

    def record_request(self, now: float) -> None:
        """A first try (not a retry) was sent at `now`."""
        self._requests.add(now)

    def balance(self, now: float) -> float:
        """Retries still allowed now (may be fractional)."""
        self._requests.expire(now)
        self._retries.expire(now)
        allowance = self.min_per_s * self.ttl_s + self.ratio * self._requests.total
        return allowance - self._retries.total

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget if any is left; False means do not retry."""
        if self.balance(now) >= 1.0 - 1e-9:
            self._retries.add(now)
            self.withdrawn_total += 1
            return True
        self.refused_total += 1
        return False

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_s={self.min_per_s}, ttl_s={self.ttl_s}, "
            f"requests={self._requests.total}, retries={self._retries.total})"
        )
