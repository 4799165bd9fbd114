"""Sans-IO fault injection: what one work request suffers under the node's active fault.

A `FaultInjector` holds a `FaultSpec`, a seeded `random.Random` and the time the fault
became active; `decide(now)` returns a `FaultDecision` and does nothing else. The
service performs the decision (sleeps, exits, answers 5xx or a wrong digest), so the
same seed and the same sequence of `now` values always give the same faults.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from enum import StrEnum

from twlb.spec import FaultSpec, FaultType


class FaultAction(StrEnum):
    """What the service does to one work request."""

    NONE = "none"  # answer normally
    DELAY = "delay"  # answer correctly, after an extra delay
    CRASH = "crash"  # exit the process; the request's connection drops
    ERROR = "error"  # answer the configured 5xx status
    BYZANTINE = "byzantine"  # answer 200 with a wrong digest
    COLLUDING = "colluding"  # answer 200 with the wrong digest the node's group agreed on
    LIE_LATENCY = "lie-latency"  # answer correctly after a delay the node hides from its metrics


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """The fault acting on one request, with the parameters the service needs to act it out."""

    action: FaultAction
    delay_s: float = 0.0
    status: int = 200

    @property
    def hidden_delay_s(self) -> float:
        """Delay the node leaves out of its own latency metrics (only a lie-latency node lies)."""
        return self.delay_s if self.action is FaultAction.LIE_LATENCY else 0.0


NO_FAULT = FaultDecision(FaultAction.NONE)


def _decision_for(fault: FaultType, spec: FaultSpec) -> FaultDecision:
    """The decision a fault type produces whenever it acts (flapping is resolved earlier)."""
    match fault:
        case FaultType.DELAY:
            return FaultDecision(FaultAction.DELAY, delay_s=spec.delay_ms / 1000.0)
        case FaultType.LIE_LATENCY:
            return FaultDecision(FaultAction.LIE_LATENCY, delay_s=spec.delay_ms / 1000.0)
        case FaultType.CRASH:
            return FaultDecision(FaultAction.CRASH)
        case FaultType.ERROR:
            return FaultDecision(FaultAction.ERROR, status=spec.error_status)
        case FaultType.BYZANTINE:
            return FaultDecision(FaultAction.BYZANTINE)
        case FaultType.COLLUDING:
            return FaultDecision(FaultAction.COLLUDING)
        case _:
            return NO_FAULT


class FaultInjector:
    """Decides, per request, whether and how the active fault acts.

    `since` is the time the fault became active: a flapping node's periods are counted
    from it, healthy first. The RNG is kept across `switch` so a node's whole history
    stays reproducible from its seed.
    """

    def __init__(self, spec: FaultSpec, rng: random.Random, since: float) -> None:
        self._rng = rng
        self.switch(spec, since)

    @property
    def spec(self) -> FaultSpec:
        return self._spec

    @property
    def since(self) -> float:
        return self._since

    def switch(self, spec: FaultSpec, now: float) -> None:
        """Make `spec` the active fault from `now` on."""
        self._spec = spec
        self._since = now
        acting = spec.flap_type if spec.type is FaultType.FLAPPING else spec.type
        self._when_acting = _decision_for(acting, spec)

    @property
    def reported_type(self) -> FaultType:
        """The fault the node admits to in its own metrics: a lie-latency node claims benign."""
        if self._spec.type is FaultType.LIE_LATENCY:
            return FaultType.BENIGN
        return self._spec.type

    def in_faulty_period(self, now: float) -> bool:
        """Whether the fault is switched on at `now` (always, except in a flapping node's
        healthy periods: even-numbered periods since `since` are healthy, odd ones faulty)."""
        if self._spec.type is FaultType.BENIGN:
            return False
        if self._spec.type is not FaultType.FLAPPING:
            return True
        elapsed = max(0.0, now - self._since)
        return math.floor(elapsed / self._spec.period_s) % 2 == 1

    def decide(self, now: float, key: str = "") -> FaultDecision:
        """The fault acting on a request for `key` arriving at `now` (one RNG draw when one
        could act; none for a colluding node, whose choice is its group's, by key)."""
        if not self.in_faulty_period(now):
            return NO_FAULT
        if self._when_acting.action is FaultAction.COLLUDING:
            if self._group_draw(key) >= self._spec.probability:
                return NO_FAULT
            return self._when_acting
        if self._rng.random() >= self._spec.probability:
            return NO_FAULT
        return self._when_acting

    def _group_hash(self, *parts: str) -> bytes:
        text = "\x1f".join(("twlb-collusion", self._spec.collusion_group, *parts))
        return hashlib.sha256(text.encode()).digest()

    def _group_draw(self, key: str) -> float:
        """A number in [0, 1) every node of the collusion group draws alike for `key`."""
        return int.from_bytes(self._group_hash("lie", key)[:8], "big") / 2.0**64

    def colluded_digest(self, key: str, rounds: int, true_digest: str) -> str:
        """The wrong answer the collusion group agreed on for this request: the same on
        every node of the group, never the true digest."""
        wrong = self._group_hash("answer", key, str(rounds), true_digest).hex()
        return wrong if wrong != true_digest else self._group_hash("again", wrong).hex()

    def wrong_digest(self, true_digest: str) -> str:
        """A byzantine answer: 64 plausible lowercase hex characters, never the true digest."""
        while True:
            wrong = f"{self._rng.getrandbits(256):064x}"
            if wrong != true_digest:
                return wrong
