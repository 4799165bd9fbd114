"""A tiny deterministic in-memory network for the gossip cores' unit tests (as
etcd-io/raft tests its core): virtual time, one seeded random source, loss, latency,
partitions, slow nodes, crashes and restarts, stopped processes (`pause`: nothing is
handled until it resumes, then everything at once), members that join later and leave,
and a filter that drops chosen messages. Every membership change is checked against
the one transition table and fed to a `FailureWatch`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

from twlb.gossip.consensus import FailureWatch
from twlb.gossip.membership import TRANSITIONS, MemberState
from twlb.gossip.nodes import GossipConfig, make_node, recover_node

from twlb.protocol import Effects

ALLOWED = {(a, b) for (a, _), b in TRANSITIONS.items()}


class InMemoryNetwork:
    def __init__(
        self,
        protocol: str,
        n: int,
        seed: int = 1,
        *,
        loss: float = 0.0,
        latency: tuple[float, float] = (0.001, 0.005),
        config: GossipConfig | None = None,
        slow: int = 0,
        slow_delay: tuple[float, float] = (0.2, 0.8),
        stagger: bool = True,
    ) -> None:
        self.protocol = protocol
        self.rng = random.Random(seed)
        self.ids = [f"n{i:04d}" for i in range(n)]
        self.loss, self.latency, self.config = loss, latency, config
        self.slow = set(self.rng.sample(self.ids, slow))
        self.slow_delay = slow_delay
        self.now = 0.0
        self._queue: list[tuple[float, int, str, str, Any]] = []
        self._seq = itertools.count()
        self._wake: dict[str, float] = {}
        self.nodes: dict[str, Any] = {}
        self.crashed: set[str] = set()
        self.cut: set[frozenset[str]] | None = None
        self.groups: list[set[str]] | None = None
        self.watch = FailureWatch(self.ids)
        self.last_state: dict[tuple[str, str], MemberState] = {}
        self.bad_transitions: list[tuple[str, str, MemberState | None, MemberState]] = []
        self.sent = self.dropped = 0
        self.events: list[tuple[float, str, tuple[Any, ...]]] = []
        self.paused: dict[str, float] = {}  # node -> when it resumes
        self.drop: Callable[[str, str, Any], bool] | None = None  # (src, dst, message)
        for node_id in self.ids:
            node = make_node(protocol, node_id, self._peers(node_id), self._node_rng(), config)
            self.nodes[node_id] = node
            start = self.rng.uniform(0, 0.5) if stagger else 0.0
            self._push(start, "start", node_id, None)

    def _node_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def _peers(self, node_id: str) -> list[str]:
        return [p for p in self.ids if p != node_id]

    def _push(self, t: float, kind: str, dst: str, payload: Any) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), kind, dst, payload))

    # -- faults ---------------------------------------------------------------------
    def crash(self, node_id: str) -> None:
        self.crashed.add(node_id)
        self.watch.crash(node_id, self.now)

    def restart(self, node_id: str) -> None:
        state = self.nodes[node_id].persistent_state()
        self.nodes[node_id] = recover_node(
            self.protocol, node_id, self._peers(node_id), self._node_rng(), self.config, state
        )
        self.crashed.discard(node_id)
        self.watch.restart(node_id, self.now)
        for key in [k for k in self.last_state if k[0] == node_id]:
            del self.last_state[key]
        self._apply(node_id, self.nodes[node_id].start(self.now))

    def pause(self, node_id: str, seconds: float) -> None:
        """SIGSTOP for `seconds`: its messages and timers wait, then all arrive at once."""
        self.paused[node_id] = self.now + seconds

    def add_node(self, node_id: str, seeds: list[str], config: GossipConfig | None = None) -> None:
        """A member that was not in the seed list joins now through `seeds`."""
        node = make_node(self.protocol, node_id, seeds, self._node_rng(), config or self.config)
        self.nodes[node_id] = node
        self.ids.append(node_id)
        self.watch.views.setdefault(node_id, {})
        self._apply(node_id, node.start(self.now))

    def leave(self, node_id: str) -> None:
        self._apply(node_id, self.nodes[node_id].leave(self.now))
        self.crashed.add(node_id)  # it falls silent (no crash for the watch: it left)

    def partition(self, *groups: set[str]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def _reachable(self, a: str, b: str) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    # -- the loop -------------------------------------------------------------------
    def run_until(self, t_end: float) -> None:
        while self._queue and self._queue[0][0] <= t_end:
            t, _, kind, dst, payload = heapq.heappop(self._queue)
            self.now = t
            if dst in self.crashed:
                continue
            if self.paused.get(dst, 0.0) > t:  # stopped: handled when it resumes
                if kind == "timer" and self._wake.get(dst) == t:
                    self._wake[dst] = self.paused[dst]
                self._push(self.paused[dst], kind, dst, payload)
                continue
            node = self.nodes[dst]
            if kind == "start":
                effects = node.start(t)
            elif kind == "timer":
                if self._wake.get(dst) != t:
                    continue
                effects = node.on_timer(t)
            else:
                src, message = payload
                effects = node.on_message(src, message, t)
            self._apply(dst, effects)
        self.now = t_end

    def _apply(self, src: str, effects: Effects) -> None:
        for dst, message in effects.send:
            self.sent += 1
            if (
                self.rng.random() < self.loss
                or not self._reachable(src, dst)
                or (self.drop is not None and self.drop(src, dst, message))
            ):
                self.dropped += 1
                continue
            delay = self.rng.uniform(*self.latency)
            if dst in self.slow:  # Lifeguard's case: it reads its messages late
                delay += self.rng.uniform(*self.slow_delay)
            self._push(self.now + delay, "message", dst, (src, message))
        if effects.wake_at is not None:
            self._wake[src] = effects.wake_at
            self._push(effects.wake_at, "timer", src, None)
        for event in effects.events:
            self.events.append((self.now, src, event))
            if event[0] == "member":
                _, node, state, _ = event
                state = MemberState(state)
                prev = self.last_state.get((src, node))
                if prev is not None and prev is not state and (prev, state) not in ALLOWED:
                    self.bad_transitions.append((src, node, prev, state))
                self.last_state[(src, node)] = state
                self.watch.observe(src, node, state, self.now)
