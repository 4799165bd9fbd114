"""Backend health (sans-IO): active heartbeats plus passive observation of real traffic.

Each backend is UNKNOWN, HEALTHY or UNHEALTHY. The tracker turns raw observations into
events (a check passed, a run of `healthy_threshold` passes, a check failed, a run of
`unhealthy_threshold` failures, a run of `passive_failures` connection errors or timeouts
in real traffic, the end of a passive cooldown) and moves each backend through
`TRANSITIONS`, one explicit table.

- New backends start UNKNOWN and count as up, so traffic flows at start; a single failed
  check takes an UNKNOWN backend out (it has never shown it works).
- A HEALTHY backend leaves after `unhealthy_threshold` consecutive failed checks, or after
  `passive_failures` consecutive connection errors/timeouts seen in real traffic (a 5xx
  is an answer: the node is alive, so it resets the passive run).
- Auto-recovery: `healthy_threshold` consecutive passing checks bring it back. A backend
  taken out by passive observation stays out for `passive_cooldown_s` even if its checks
  pass (a node can answer /healthz and still time out real work); when the cooldown ends
  with no failed check since, it returns as UNKNOWN and real traffic judges it again.
- Gossip: a backend every live member's gossip agrees is dead leaves at once and stays out
  whatever its checks say; when the members readmit it, it returns as UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from twlb.outcome import CONNECT_ERROR, TIMEOUT, Outcome


class HealthState(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class HealthEvent(StrEnum):
    CHECK_PASSED = "check_passed"  # a passing check short of the healthy threshold
    RISE = "rise"  # healthy_threshold consecutive passing checks
    CHECK_FAILED = "check_failed"  # a failed check short of the unhealthy threshold
    FALL = "fall"  # unhealthy_threshold consecutive failed checks
    PASSIVE_FALL = "passive_fall"  # passive_failures consecutive failures in real traffic
    COOLDOWN_OVER = "cooldown_over"  # a passive cooldown ended with no failed check since
    GOSSIP_DEAD = "gossip_dead"  # every live backend's gossip marks it dead (twlb.gossip)
    GOSSIP_READMIT = "gossip_readmit"  # the members took it back


_U, _H, _X = HealthState.UNKNOWN, HealthState.HEALTHY, HealthState.UNHEALTHY

#: (state, event) -> next state, for every pair.
TRANSITIONS: dict[tuple[HealthState, HealthEvent], HealthState] = {
    (_U, HealthEvent.CHECK_PASSED): _U,
    (_U, HealthEvent.RISE): _H,
    (_U, HealthEvent.CHECK_FAILED): _X,
    (_U, HealthEvent.FALL): _X,
    (_U, HealthEvent.PASSIVE_FALL): _X,
    (_U, HealthEvent.COOLDOWN_OVER): _U,
    (_U, HealthEvent.GOSSIP_DEAD): _X,
    (_U, HealthEvent.GOSSIP_READMIT): _U,
    (_H, HealthEvent.CHECK_PASSED): _H,
    (_H, HealthEvent.RISE): _H,
    (_H, HealthEvent.CHECK_FAILED): _H,
    (_H, HealthEvent.FALL): _X,
    (_H, HealthEvent.PASSIVE_FALL): _X,
    (_H, HealthEvent.COOLDOWN_OVER): _H,
    (_H, HealthEvent.GOSSIP_DEAD): _X,
    (_H, HealthEvent.GOSSIP_READMIT): _H,
    (_X, HealthEvent.CHECK_PASSED): _X,
    (_X, HealthEvent.RISE): _H,
    (_X, HealthEvent.CHECK_FAILED): _X,
    (_X, HealthEvent.FALL): _X,
    (_X, HealthEvent.PASSIVE_FALL): _X,
    (_X, HealthEvent.COOLDOWN_OVER): _U,
    (_X, HealthEvent.GOSSIP_DEAD): _X,
    (_X, HealthEvent.GOSSIP_READMIT): _U,
}


@dataclass
class BackendHealth:
    """What the tracker knows about one backend."""

    state: HealthState = HealthState.UNKNOWN
    passes: int = 0  # consecutive passing checks
    failures: int = 0  # consecutive failed checks
    passive_failures: int = 0  # consecutive connection errors/timeouts in traffic
    cooldown_until: float | None = None  # set while out because of passive observation
    gossip_dead: bool = False  # out because the gossip members agree it is dead
    since: float = 0.0  # time of the last state change
    transitions: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "consecutive_passes": self.passes,
            "consecutive_failures": self.failures,
            "consecutive_passive_failures": self.passive_failures,
            "cooldown_until": self.cooldown_until,
            "gossip_dead": self.gossip_dead,
            "since": self.since,
            "transitions": self.transitions,
        }


class HealthTracker:
    """Health of every backend, from active checks and passive outcomes; no clock of its own."""

    def __init__(
        self,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        passive_failures: int = 5,
        passive_cooldown_s: float = 10.0,
    ) -> None:
        if min(healthy_threshold, unhealthy_threshold, passive_failures) < 1:
            raise ValueError("health thresholds must be at least 1")
        if passive_cooldown_s < 0:
            raise ValueError(f"passive_cooldown_s must be >= 0, got {passive_cooldown_s}")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.passive_threshold = passive_failures
        self.passive_cooldown_s = passive_cooldown_s
        self._backends: dict[str, BackendHealth] = {}

    def set_backends(self, backends: Iterable[str], now: float) -> None:
        """The full backend list: known ones keep their health, new ones start UNKNOWN."""
        old = self._backends
        self._backends = {b: old[b] if b in old else BackendHealth(since=now) for b in backends}

    def apply(self, backend: str, event: HealthEvent, now: float) -> HealthState:
        """Move `backend` through the transition table on `event`; returns the new state.

        The observation methods below call this with the events they classify; it is public
        so a caller (or a test) can inject an event directly.
        """
        h = self._backends[backend]
        self._apply(h, event, now)
        return h.state

    def _apply(self, h: BackendHealth, event: HealthEvent, now: float) -> None:
        new = TRANSITIONS[(h.state, event)]
        if new is not h.state:
            h.state = new
            h.since = now
            h.transitions += 1
            if new is not HealthState.UNHEALTHY:
                h.cooldown_until = None
                h.passive_failures = 0

    def on_check(self, backend: str, ok: bool, now: float) -> HealthState:
        """An active health check of `backend` passed (`ok`) or failed; returns the new state."""
        h = self._backends[backend]
        if ok:
            h.passes += 1
            h.failures = 0
            cooling = h.cooldown_until is not None and now < h.cooldown_until
            rise = h.passes >= self.healthy_threshold and not cooling and not h.gossip_dead
            self._apply(h, HealthEvent.RISE if rise else HealthEvent.CHECK_PASSED, now)
        else:
            h.failures += 1
            h.passes = 0
            # A failed check during a passive cooldown confirms the fault: checks decide now.
            h.cooldown_until = None
            fall = h.failures >= self.unhealthy_threshold
            self._apply(h, HealthEvent.FALL if fall else HealthEvent.CHECK_FAILED, now)
        return h.state

    def on_passive(self, backend: str, outcome: Outcome, now: float) -> HealthState:
        """The outcome of one real-traffic try; runs of connection errors/timeouts take it out."""
        h = self._backends.get(backend)
        if h is None:  # a try that ended after its backend was removed
            return HealthState.UNKNOWN
        if outcome is CONNECT_ERROR or outcome is TIMEOUT:
            h.passive_failures += 1
            if h.passive_failures >= self.passive_threshold:
                was_down = h.state is _X
                h.passes = 0
                h.passive_failures = 0
                self._apply(h, HealthEvent.PASSIVE_FALL, now)
                if not was_down:  # already out on failed checks: the checks decide
                    h.cooldown_until = now + self.passive_cooldown_s
        else:
            h.passive_failures = 0
        return h.state

    def on_gossip(self, backend: str, dead: bool, now: float) -> HealthState:
        """The members' verdict: agreed dead takes it out at once and keeps it out (its
        checks cannot bring it back); readmitted, it returns as UNKNOWN, for its checks
        and real traffic to judge, as after a passive cooldown."""
        h = self._backends.get(backend)
        if h is None:
            return HealthState.UNKNOWN
        if dead and not h.gossip_dead:
            h.gossip_dead = True
            h.passes = 0
            h.cooldown_until = None
            self._apply(h, HealthEvent.GOSSIP_DEAD, now)
        elif not dead and h.gossip_dead:
            h.gossip_dead = False
            h.passes = 0
            h.failures = 0
            self._apply(h, HealthEvent.GOSSIP_READMIT, now)
        return h.state

    def tick(self, now: float) -> list[str]:
        """End passive cooldowns that are due; returns the backends that came back."""
        back = []
        for b, h in self._backends.items():
            if h.cooldown_until is not None and now >= h.cooldown_until:
                h.cooldown_until = None
                h.passes = 0
                self._apply(h, HealthEvent.COOLDOWN_OVER, now)
                back.append(b)
        return back

    def is_up(self, backend: str) -> bool:
        h = self._backends.get(backend)
        return h is not None and h.state is not HealthState.UNHEALTHY

    def state(self, backend: str) -> HealthState:
        return self._backends[backend].state

    def up(self, backends: Sequence[str]) -> list[str]:
        """The given backends that are up, in the given order."""
        known = self._backends
        return [b for b in backends if b in known and known[b].state is not _X]

    def describe(self, backend: str) -> dict[str, object]:
        return self._backends[backend].describe()

    @property
    def backends(self) -> list[str]:
        return list(self._backends)
