"""Consensus on failure: when the live members agree that a node is down.

Fed the members' views (membership events from the cores in the simulator and the
tests, polled `GET /gossip` answers on real processes) and the ground truth (which nodes
were killed and restarted, and when), a `FailureWatch` reports per failure the first
suspicion, the time every live member first held it suspect or down at once, the first
death verdict and full agreement (every live member marks the node dead or left), per
return the time every live member has it alive again, and false positives: a death
verdict about a node that was not down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twlb.gossip.membership import MemberState, is_down


def agreed_down(views: Mapping[str, Mapping[str, MemberState]], node: str) -> bool:
    """Every observer's view marks `node` dead or left (and there is an observer). A
    member a view does not mention is as the seed list made it: alive."""
    observers = [v for o, v in views.items() if o != node]
    return bool(observers) and all(is_down(v.get(node, MemberState.ALIVE)) for v in observers)


def agreed_alive(views: Mapping[str, Mapping[str, MemberState]], node: str) -> bool:
    observers = [v for o, v in views.items() if o != node]
    alive = MemberState.ALIVE
    return bool(observers) and all(v.get(node, alive) is alive for v in observers)


@dataclass(slots=True)
class Failure:
    node: str
    failed_at: float
    first_suspect: float | None = None
    all_suspect: float | None = None  # every live member held it suspect or down
    first_dead: float | None = None
    agreed: float | None = None
    restarted_at: float | None = None
    readmitted: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def since(t: float | None, origin: float | None) -> float | None:
            return None if t is None or origin is None else round(t - origin, 6)

        return {
            "node": self.node,
            "verdict": "dead" if self.agreed is not None else "undecided",
            "failed_at": self.failed_at,
            "first_suspicion_s": since(self.first_suspect, self.failed_at),
            "all_suspect_s": since(self.all_suspect, self.failed_at),
            "first_detection_s": since(self.first_dead, self.failed_at),
            "agreement_s": since(self.agreed, self.failed_at),
            "readmitted_s": since(self.readmitted, self.restarted_at),
        }


@dataclass
class FailureWatch:
    """Agreement tracked incrementally: per node, how many live observers hold it down
    and how many hold it anything but alive, so that each membership change costs O(1)
    even at 10,000 observers."""

    nodes: Iterable[str]
    views: dict[str, dict[str, MemberState]] = field(init=False)
    down: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    false_positives: list[tuple[float, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.views = {n: {} for n in self.nodes}
        self._held_down: dict[str, int] = {}  # node -> live observers holding it down
        self._not_alive: dict[str, int] = {}  # node -> live observers not holding it alive
        self._open_failures: dict[str, Failure] = {}

    def _live_observers(self, node: str) -> int:
        return len(self.views) - len(self.down) - (0 if node in self.down else 1)

    def _count(self, observer: str, sign: int) -> None:
        for node, state in self.views.get(observer, {}).items():
            if is_down(state):
                self._held_down[node] = self._held_down.get(node, 0) + sign
            if state is not MemberState.ALIVE:
                self._not_alive[node] = self._not_alive.get(node, 0) + sign

    def crash(self, node: str, now: float) -> None:
        if node not in self.down:
            self._count(node, -1)  # a dead observer's view no longer counts
            self.down.add(node)
        failure = Failure(node, now)
        self.failures.append(failure)
        self._open_failures[node] = failure
        self._check_all(now)

    def restart(self, node: str, now: float) -> None:
        self.down.discard(node)
        self.views[node] = {}
        failure = self._open_failures.get(node)
        if failure is not None:
            failure.restarted_at = now
        self._check_all(now)

    def live_views(self) -> dict[str, dict[str, MemberState]]:
        return {o: v for o, v in self.views.items() if o not in self.down}

    def observe(self, observer: str, node: str, state: MemberState, now: float) -> None:
        if observer in self.down or observer == node:
            return
        view = self.views.setdefault(observer, {})
        before = view.get(node, MemberState.ALIVE)
        view[node] = state
        self._held_down[node] = self._held_down.get(node, 0) + is_down(state) - is_down(before)
        self._not_alive[node] = (
            self._not_alive.get(node, 0)
            + (state is not MemberState.ALIVE)
            - (before is not MemberState.ALIVE)
        )
        failure = self._open_failures.get(node)
        if node in self.down and failure is not None:
            if state is MemberState.SUSPECT and failure.first_suspect is None:
                failure.first_suspect = now
            if is_down(state) and failure.first_dead is None:
                failure.first_dead = now
                if failure.first_suspect is None:
                    failure.first_suspect = now
        elif state is MemberState.DEAD:
            self.false_positives.append((now, observer, node))
        if failure is not None:
            self._check(failure, now)

    def _check(self, f: Failure, now: float) -> None:
        observers = self._live_observers(f.node)
        if observers > 0 and f.node in self.down:
            if f.all_suspect is None and self._not_alive.get(f.node, 0) == observers:
                f.all_suspect = now
            if f.agreed is None and self._held_down.get(f.node, 0) == observers:
                f.agreed = now
        if (
            f.restarted_at is not None
            and f.readmitted is None
            and f.node not in self.down
            and observers > 0
            and self._not_alive.get(f.node, 0) == 0
        ):
            f.readmitted = now

    def _check_all(self, now: float) -> None:
        for failure in self._open_failures.values():
            self._check(failure, now)

    def report(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in self.failures]
