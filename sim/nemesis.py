"""A nemesis that aims, as Jepsen's does: faults chosen while the run goes, at the node
that leads now, at the partition that hurts it most, in the instant after it acts.

Plain faults (`twlb.sim.runner.Fault`: partition, crash, loss, ...) are fixed before the
run. The episodes here are one schedule row each, `[at, NAME, [until, seed]]`, and decide
their targets while they run from what the nodes say (`leadership()`: Raft's term,
Multi-Paxos's ballot, PBFT's view, when the node believes it leads) and from the events
they emit (`kernel.watchers`). Each draws from its own `random.Random` seeded by the row,
so a schedule replays exactly, and shrinking one episode away leaves the others' draws as
they were. Every episode repairs what it broke by `until`: it recovers the nodes it
crashed, heals the partitions it made and puts clocks back to the true time.

    leader-crash          crash the leader (primary), recover it 0.05-1.5 s later, again
    leader-pause          stall the leader's process 0.2-2 s (a GC pause), again
    leader-isolate        cut the leader off from every other node for 0.3-3 s, again
    leader-minority       partition with the leader on the minority side, again
    leader-majority       partition with the leader on the majority side, again
    isolate-after-append  the instant a leader appends a client's operation (Raft
                          append, Paxos accept, PBFT pre-prepare), heal the last cut and
                          cut this leader off, alone or with one follower (still a
                          minority), before its messages arrive (for 0.3-2.5 s, or until the next leader
                          appends)
    vote-crash            cut the leader off to force elections, and crash each node in
                          the instant after it grants a vote (Raft) or promise (Paxos),
                          bringing it back 0-0.05 s later with what it persisted
    ack-crash             crash a coordinator in the instant after it acknowledges a
                          client's write (the hash table's "write" event), bringing it
                          back 0.05-1.5 s later: what it meant to do next is gone
    clock                 the leader's or a random node's clock: jumps (bumps of up to
                          +-10 s), a rate from 0.25x to 4x, or strobing between two
                          readings every 10-100 ms; reset to the true time at the end

Bridge and ring partitions do not aim and are plain faults (`bridge_halves`,
`ring_cuts`): a bridge splits the cluster in two halves that both still see one node;
a ring lets each node see only its nearest neighbours, a majority each, no two of them
the same one.

Crashes never exceed `Arena.max_down` nodes down at once (what the protocol tolerates),
counting crashes other rows have planned. A crash loses what a real crash loses: the
node is rebuilt from `persistent_state()` as it was when the crash hit
(`twlb.sim.network.Network.fail_node`), and nothing of its memory. The byzantine
replicas of a run are the adversary's own: the aiming episodes leave a byzantine leader
alone, so that byzantine nodes get their turn as primary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twlb.sim.kernel import Kernel

from twlb.protocol import ClientRequest, NodeId, quorum

#: The aiming episodes, by their `--nemesis` names.
TARGETED: tuple[str, ...] = (
    "leader-crash",
    "leader-pause",
    "leader-isolate",
    "leader-minority",
    "leader-majority",
    "isolate-after-append",
    "vote-crash",
    "ack-crash",
    "clock",
)

#: Events by which a leader appends a client's operation, and by which a node votes.
APPEND_EVENTS = frozenset({"append", "accepted", "pre-prepare"})
VOTE_EVENTS = frozenset({"vote", "promise"})
#: ... and by which a coordinator acknowledges a client's write (the hash table's).
ACK_EVENTS = frozenset({"write"})


@dataclass
class Arena:
    """What an episode acts on: the kernel of a run and the bounds it must keep."""

    kernel: Kernel
    nodes: Sequence[NodeId]
    max_down: int  # recoverable crashes at once
    byzantine: frozenset[NodeId] = frozenset()
    # (start, end) of the crashes fixed in the schedule, so aimed ones leave room for them
    planned_crashes: Sequence[tuple[float, float]] = ()
    errors: list[str] = field(default_factory=list)
    struck: tuple[float, NodeId] | None = None  # the last event-triggered strike (time, node)

    @property
    def now(self) -> float:
        return self.kernel.now

    def leader(self) -> NodeId | None:
        """The node that leads with the highest term, ballot or view, among those that
        believe they lead; None while nobody does."""
        best: tuple[Any, NodeId] | None = None
        for node_id, node in self.kernel.nodes.items():
            lead = getattr(node, "leadership", None)
            claim = lead() if lead is not None else None
            if claim is not None and (best is None or (claim, node_id) > best):
                best = (claim, node_id)
        return None if best is None else best[1]

    def down(self) -> int:
        return sum(1 for state in self.kernel.network.down.values() if state is not None)

    def may_crash(self, until: float) -> bool:
        """Whether one more node may go down now and stay down until `until`."""
        now = self.now
        planned = sum(1 for start, _end in self.planned_crashes if now < start <= until)
        return self.down() + planned + 1 <= self.max_down

    def attempt(self, action: Callable[..., Any], *args: Any) -> bool:
        """Apply a fault; one that no longer applies (the node recovered meanwhile, say)
        is recorded, not fatal."""
        try:
            action(*args)
        except ValueError as err:
            self.errors.append(f"{self.now:g}s {getattr(action, '__name__', action)}: {err}")
            return False
        return True


class Episode:
    """One aiming episode: strikes from `start` until `until`, then repairs."""

    def __init__(self, arena: Arena, name: str, start: float, until: float, seed: int) -> None:
        if name not in TARGETED:
            raise ValueError(f"unknown nemesis {name!r}; aiming ones: {', '.join(TARGETED)}")
        if not until > start:
            raise ValueError(f"{name}: an episode must end after it starts ({start}..{until})")
        self.arena = arena
        self.name = name
        self.start = start
        self.until = until
        self.rng = random.Random(f"nemesis/{name}/{seed}")
        self.crashed: set[NodeId] = set()
        self.skewed: set[NodeId] = set()
        self.cut = False
        self.side: frozenset[NodeId] = frozenset()  # the side of the cut in force
        self.armed = False
        self.strike_id = 0  # the strike whose timed repair is due (stale ones do nothing)

    # -- scheduling -------------------------------------------------------------------
    def begin(self) -> None:
        kernel = self.arena.kernel
        kernel.call_at(self.until, self.finish)
        if self.name in ("isolate-after-append", "vote-crash", "ack-crash"):
            kernel.watchers.append(self.on_events)
        self.strike()

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        at = self.arena.now + delay
        if at < self.until:
            self.arena.kernel.call_at(at, fn, *args)

    def strike(self) -> None:
        if self.arena.now >= self.until:
            return
        getattr(self, "_" + self.name.replace("-", "_"))()

    def finish(self) -> None:
        """At `until`: undo whatever is still broken, and stop watching."""
        kernel = self.arena.kernel
        network = kernel.network
        if self.on_events in kernel.watchers:
            kernel.watchers.remove(self.on_events)
        self.armed = False
        if self.cut:
            network.heal()
            self.cut = False
            self.side = frozenset()
        for node in sorted(self.crashed):
            if node in network.down:
                self.arena.attempt(network.recover_node, node)
        self.crashed.clear()
        for node in sorted(self.skewed):
            network.set_clock_skew(node, 0.0, 1.0)
        self.skewed.clear()

    def _target(self) -> NodeId | None:
        """The leader, unless it is byzantine (the adversary's own node, left to lead)."""
        leader = self.arena.leader()
        return None if leader is None or leader in self.arena.byzantine else leader

    def _retry_soon(self) -> None:
        self.later(self.rng.uniform(0.05, 0.2), self.strike)

    def _gap(self) -> float:
        return self.rng.uniform(0.2, 1.5)

    # -- crash and pause ----------------------------------------------------------------
    def crash(self, node: NodeId, down_for: float) -> None:
        arena = self.arena
        back = min(arena.now + down_for, self.until)
        if (
            node in arena.kernel.nodes
            and arena.may_crash(back)
            and arena.attempt(arena.kernel.network.fail_node, node)
        ):
            self.crashed.add(node)
            arena.kernel.call_at(back, self.recover, node)

    def recover(self, node: NodeId) -> None:
        if node in self.crashed:
            self.crashed.discard(node)
            if node in self.arena.kernel.network.down:
                self.arena.attempt(self.arena.kernel.network.recover_node, node)

    def _leader_crash(self) -> None:
        node = self._target()
        if node is None:
            return self._retry_soon()
        down_for = self.rng.uniform(0.05, 1.5)
        self.crash(node, down_for)
        self.later(down_for + self._gap(), self.strike)

    def _leader_pause(self) -> None:
        node = self._target()
        if node is None:
            return self._retry_soon()
        stalled = min(self.rng.uniform(0.2, 2.0), self.until - self.arena.now)
        self.arena.attempt(self.arena.kernel.network.pause_node, node, stalled)
        self.later(stalled + self._gap(), self.strike)

    # -- partitions ---------------------------------------------------------------------
    def partition(self, side: Sequence[NodeId], rest: Sequence[NodeId], lasting: float) -> None:
        network = self.arena.kernel.network
        if not side or not rest:
            return
        network.heal()
        network.create_partition(set(side), set(rest))
        self.cut = True
        self.side = frozenset(side)
        self.strike_id += 1
        self.later(lasting, self.mend, self.strike_id)

    def mend(self, strike_id: int) -> None:
        if self.cut and strike_id == self.strike_id:
            self.arena.kernel.network.heal()
            self.cut = False
            self.side = frozenset()

    def _others(self, node: NodeId) -> list[NodeId]:
        return [n for n in self.arena.nodes if n != node]

    def _split(self, leader: NodeId, leader_side: int) -> tuple[list[NodeId], list[NodeId]]:
        others = self._others(leader)
        self.rng.shuffle(others)
        side = [leader, *others[: leader_side - 1]]
        return side, others[leader_side - 1 :]

    def _leader_isolate(self) -> None:
        node = self._target()
        if node is None:
            return self._retry_soon()
        lasting = self.rng.uniform(0.3, 3.0)
        self.partition([node], self._others(node), lasting)
        self.later(lasting + self._gap(), self.strike)

    def _leader_minority(self) -> None:
        node = self._target()
        if node is None:
            return self._retry_soon()
        n = len(self.arena.nodes)
        size = self.rng.randint(1, max(1, n - quorum(n)))
        lasting = self.rng.uniform(0.3, 3.0)
        self.partition(*self._split(node, size), lasting)
        self.later(lasting + self._gap(), self.strike)

    def _leader_majority(self) -> None:
        node = self._target()
        if node is None:
            return self._retry_soon()
        n = len(self.arena.nodes)
        size = self.rng.randint(quorum(n), n - 1) if n > 1 else 1
        lasting = self.rng.uniform(0.3, 3.0)
        self.partition(*self._split(node, size), lasting)
        self.later(lasting + self._gap(), self.strike)

    # -- strikes in the instant after an event ------------------------------------------
    def _isolate_after_append(self) -> None:
        self.armed = True  # on_events strikes at the leader's next append

    def _ack_crash(self) -> None:
        self.armed = True  # on_events strikes at the next acknowledged write

    def _vote_crash(self) -> None:
        self.armed = True
        node = self._target()
        if node is None:
            return self._retry_soon()
        lasting = self.rng.uniform(0.3, 2.0)
        self.partition([node], self._others(node), lasting)
        self.later(lasting + self._gap(), self.strike)

    def on_events(self, node_id: NodeId, events: list[tuple[Any, ...]]) -> None:
        if not self.armed or self.arena.now >= self.until:
            return
        if self.name == "vote-crash":
            if node_id not in self.arena.byzantine and any(e[0] in VOTE_EVENTS for e in events):
                self.crash(node_id, self.rng.uniform(0.0, 0.05))
            return
        if self.name == "ack-crash":
            if any(e[0] in ACK_EVENTS for e in events):
                self.crash(node_id, self.rng.uniform(0.05, 1.5))
            return
        if node_id in self.arena.byzantine or not any(
            e[0] in APPEND_EVENTS and isinstance(e[-1], ClientRequest) for e in events
        ):
            return
        node = self.arena.kernel.nodes.get(node_id)
        if (
            node is None
            or node_id in self.side
            or self.arena.struck == (self.arena.now, node_id)  # another episode just did
            or getattr(node, "leadership", lambda: None)() is None
        ):
            return  # a follower replicating, a leader that stood down, or one cut off already
        self.arena.struck = (self.arena.now, node_id)
        # Heal the last cut and cut this leader off before its messages arrive, so that
        # its new entry is on it alone (or on it and one follower): then the next leader
        # is elected without the entry, appends its own, is cut off in turn, ... which is
        # how Figure 8 of the Raft paper builds logs that disagree at one index.
        others = self._others(node_id)
        side = [node_id]
        n = len(self.arena.nodes)
        if n - quorum(n) >= 2 and self.rng.random() < 0.5:
            side.append(self.rng.choice(others))  # the entry reaches one follower only
        self.partition(side, [n for n in others if n not in side], self.rng.uniform(0.3, 2.5))

    # -- clocks -------------------------------------------------------------------------
    def _clock(self) -> None:
        arena = self.arena
        leader = self._target()
        node = leader if leader is not None and self.rng.random() < 0.5 else None
        if node is None:
            node = self.rng.choice(list(arena.nodes))
        network = arena.kernel.network
        offset, rate = network.skew.get(node, (0.0, 1.0))
        now = arena.now
        kind = self.rng.choice(("bump", "rate", "strobe"))
        lasting = self.rng.uniform(0.5, 4.0)
        self.skewed.add(node)
        if kind == "bump":
            jump = self.rng.choice((-1, 1)) * self.rng.uniform(0.2, 10.0)
            network.set_clock_skew(node, offset + jump, rate)
        elif kind == "rate":
            new_rate = self.rng.choice((self.rng.uniform(0.25, 0.8), self.rng.uniform(1.25, 4.0)))
            # Continuous at `now`: the clock keeps its reading and changes its pace.
            network.set_clock_skew(node, offset + (rate - new_rate) * now, new_rate)
        else:
            self._strobe(node, offset, rate, self.rng.uniform(0.2, 3.0), now + lasting)
        self.later(lasting + self._gap(), self.strike)

    def _strobe(self, node: NodeId, offset: float, rate: float, delta: float, stop: float) -> None:
        network = self.arena.kernel.network
        if self.arena.now >= min(stop, self.until):
            return
        current = network.skew.get(node, (0.0, 1.0))[0]
        network.set_clock_skew(node, offset + delta if current == offset else offset, rate)
        self.later(self.rng.uniform(0.01, 0.1), self._strobe, node, offset, rate, delta, stop)


def start_episode(arena: Arena, name: str, at: float, args: Sequence[Any]) -> Episode:
    """Begin the episode of schedule row `[at, name, [until, seed]]` now."""
    if len(args) != 2:
        raise ValueError(f"{name}: expected [until, seed], got {list(args)}")
    until, seed = float(args[0]), int(args[1])
    episode = Episode(arena, name, at, until, seed)
    episode.begin()
    return episode


def bridge_halves(
    rng: random.Random, nodes: Sequence[NodeId]
) -> tuple[tuple[NodeId, ...], tuple[NodeId, ...]]:
    """Two halves to cut from each other; the one node in neither is the bridge, which
    still sees both."""
    members = list(nodes)
    rng.shuffle(members)
    rest = members[1:]  # members[0] is the bridge
    half = len(rest) // 2
    return tuple(sorted(rest[:half])), tuple(sorted(rest[half:]))


def ring_cuts(rng: random.Random, nodes: Sequence[NodeId]) -> tuple[tuple[NodeId, NodeId], ...]:
    """Links to cut so that the nodes, shuffled onto a ring, each see only those within
    k places of them: 2k + 1 >= a majority, and no two see the same majority."""
    members = list(nodes)
    rng.shuffle(members)
    n = len(members)
    k = quorum(n) // 2  # ceil((majority - 1) / 2)
    cuts = []
    for i in range(n):
        for j in range(i + 1, n):
            distance = min(j - i, n - (j - i))
            if distance > k:
                cuts.append(tuple(sorted((members[i], members[j]))))
    return tuple(sorted(cuts))


__all__ = [
    "ACK_EVENTS",
    "APPEND_EVENTS",
    "Arena",
    "Episode",
    "TARGETED",
    "VOTE_EVENTS",
    "bridge_halves",
    "ring_cuts",
    "start_episode",
]
