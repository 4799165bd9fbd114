"""A retry budget (sans-IO): retries may be at most a ratio of recent live traffic.

Finagle's and Linkerd's model: every request deposits `ratio` of a token, every retry
withdraws one, deposits expire after `ttl_s`, and `min_per_s` retries per second are
always allowed so a quiet service can still retry. Used by the balancer and the client.
"""

from __future__ import annotations

from collections import deque


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
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.withdrawn_total = 0
        self.refused_total = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.ttl_s
        for q in (self._requests, self._retries):
            while q and q[0] <= horizon:
                q.popleft()

    def record_request(self, now: float) -> None:
        """A first try (not a retry) was sent at `now`."""
        self._requests.append(now)

    def balance(self, now: float) -> float:
        """Retries still allowed now (may be fractional)."""
        self._expire(now)
        allowance = self.min_per_s * self.ttl_s + self.ratio * len(self._requests)
        return allowance - len(self._retries)

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget if any is left; False means do not retry."""
        if self.balance(now) >= 1.0 - 1e-9:
            self._retries.append(now)
            self.withdrawn_total += 1
            return True
        self.refused_total += 1
        return False

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_s={self.min_per_s}, ttl_s={self.ttl_s}, "
            f"requests={len(self._requests)}, retries={len(self._retries)})"
        )
