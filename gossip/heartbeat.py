"""The four heartbeat-gossip protocols of Ranganathan, George, Todd and Chidester (2001),
as one sans-IO core that differs only in whom a node sends its table to each round.

Every `interval` a node bumps its own heartbeat and sends its whole table to one peer:
  random              a random live peer (van Renesse, Minsky, Hayden 1998)
  round-robin         in round r, node i sends to i + r mod N (r = 1..N-1, cyclic)
  binary-round-robin  in round r, node i sends to i + 2^(r-1) mod N (r = 1..ceil(log2 N))
  sequence-check      round-robin whose tables carry the sender's round number: each
                      node hears from each sender exactly once every N-1 of its rounds,
                      so a gap counts lost messages, and a sender missing `miss_limit`
                      of its expected rounds is suspected before T_fail.
A member whose heartbeat has not grown for `suspect_fraction` of T_fail is suspect, for
T_fail dead. T_fail scales with how many rounds a table takes to reach everyone at the
current N (`dissemination_rounds`), as van Renesse et al. choose it from N.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twlb.gossip.membership import MemberEvent, MemberState, next_state
from twlb.gossip.messages import HeartbeatEntry, HeartbeatTable

from twlb.protocol import ClientRequest, Effects, NodeId

HEARTBEAT_PROTOCOLS = ("random", "round-robin", "binary-round-robin", "sequence-check")


def dissemination_rounds(protocol: str, n: int) -> int:
    """Rounds for one node's heartbeat to reach all n nodes with no loss.

    round-robin: the informed set after k rounds is {0 .. k(k+1)/2} (offsets 1..k), so
    the least k with k(k+1)/2 >= n-1; binary: offsets 1, 2, 4, ... double it each round,
    ceil(log2 n); random: log2 n + ln n, Pittel's rumour-spreading time (1987).
    """
    if n <= 1:
        return 0
    if protocol == "binary-round-robin":
        return math.ceil(math.log2(n))
    if protocol in ("round-robin", "sequence-check"):
        return math.ceil((math.sqrt(8 * (n - 1) + 1) - 1) / 2)
    return math.ceil(math.log2(n) + math.log(n))


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    interval: float = 0.5  # seconds per gossip round
    #: T_fail in rounds = fail_mult x dissemination_rounds(N) + fail_slack
    fail_mult: float = 3.0
    fail_slack: int = 4
    suspect_fraction: float = 0.5
    generation: int = 0  # set higher on each restart (the live agent uses start time)
    miss_limit: int = 2  # sequence-check: missed expected rounds before suspicion
    max_members: int = 4096  # a table never grows past this, whatever peers send

    def fail_after(self, protocol: str, n: int) -> float:
        return self.interval * (
            self.fail_mult * dissemination_rounds(protocol, n) + self.fail_slack
        )


@dataclass(slots=True)
class _Row:
    generation: int
    heartbeat: int
    updated_at: float
    state: MemberState

    @property
    def version(self) -> tuple[int, int]:
        return (self.generation, self.heartbeat)


class HeartbeatNode:
    """One node of a heartbeat protocol (the contract of `twlb.protocol`)."""

    def __init__(
        self,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: HeartbeatConfig | None = None,
        protocol: str = "random",
    ) -> None:
        if protocol not in HEARTBEAT_PROTOCOLS:
            raise ValueError(f"unknown heartbeat protocol {protocol!r}")
        self.node_id = node_id
        self.protocol = protocol
        self.rng = rng
        self.config = config or HeartbeatConfig()
        self.rows: dict[NodeId, _Row] = {}
        self._seeds = [p for p in peers if p != node_id]
        self._ring: list[NodeId] | None = None
        self.round = 0
        self._next_round = 0.0
        self._left = False
        # sequence-check: per sender, its last round number, when its next direct
        # table is due, and how many due tables in a row never came
        self._last_round: dict[NodeId, int] = {}
        self._due: dict[NodeId, float] = {}
        self._misses: dict[NodeId, int] = {}
        self.lost_messages = 0

    # -- the contract ---------------------------------------------------------------
    def start(self, now: float) -> Effects:
        self.rows[self.node_id] = _Row(self.config.generation, 0, now, MemberState.ALIVE)
        for peer in self._seeds[: self.config.max_members - 1]:
            self.rows[peer] = _Row(-1, -1, now, MemberState.ALIVE)
        self._ring = None
        self._next_round = now + self.config.interval
        return Effects(wake_at=self._next_round, events=[("generation", self.config.generation)])

    def on_timer(self, now: float) -> Effects:
        effects = Effects()
        if self._left:
            return effects
        if now >= self._next_round:
            self._gossip_round(now, effects)
            self._next_round = max(self._next_round + self.config.interval, now + 1e-9)
        self._check_deadlines(now, effects)
        effects.wake_at = self._next_round
        return effects

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        effects = Effects()
        if not isinstance(message, HeartbeatTable) or self._left:
            return effects
        for entry in message.entries[: self.config.max_members]:
            self._merge(entry, message.sender, now, effects)
        if self.protocol == "sequence-check":
            self._sequence(message.sender, message.round, now, effects)
        return effects

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        return Effects()  # gossip serves no client operations

    def persistent_state(self) -> Mapping[str, Any]:
        return {"generation": self.config.generation}

    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: HeartbeatConfig | None,
        state: Mapping[str, Any],
        protocol: str = "random",
    ) -> HeartbeatNode:
        """A restart: same identity, a higher generation, an empty table."""
        cfg = replace(config or HeartbeatConfig(), generation=int(state["generation"]) + 1)
        return cls(node_id, peers, rng, cfg, protocol)

    # -- graceful leave and views -------------------------------------------------------
    def leave(self, now: float) -> Effects:
        """Announce departure to every live peer, then fall silent."""
        me = self.rows[self.node_id]
        me.heartbeat += 1
        me.state = MemberState.LEFT
        table = self._table()
        self._left = True
        sends = [(n, table) for n in self._live_peers()]
        return Effects(send=sends, events=[("member", self.node_id, "left", me.version)])

    def view(self) -> list[tuple[NodeId, MemberState, tuple[int, int]]]:
        return [(n, r.state, r.version) for n, r in sorted(self.rows.items())]

    def fail_after(self) -> float:
        return self.config.fail_after(self.protocol, len(self.rows))

    # -- one round --------------------------------------------------------------------
    def _gossip_round(self, now: float, effects: Effects) -> None:
        me = self.rows[self.node_id]
        me.heartbeat += 1
        me.updated_at = now
        self.round += 1
        target = self._target()
        if target is not None:
            effects.send.append((target, self._table()))

    def _target(self) -> NodeId | None:
        if self.protocol == "random":
            live = self._live_peers()
            return self.rng.choice(live) if live else None
        ring = self._sorted_ring()
        n = len(ring)
        if n < 2:
            return None
        if self.protocol == "binary-round-robin":
            k = max(1, math.ceil(math.log2(n)))
            offset = 1 << ((self.round - 1) % k)
        else:
            offset = 1 + (self.round - 1) % (n - 1)
        return ring[(ring.index(self.node_id) + offset) % n]

    def _sorted_ring(self) -> list[NodeId]:
        if self._ring is None:
            self._ring = sorted(self.rows)
        return self._ring

    def _live_peers(self) -> list[NodeId]:
        return [
            n
            for n, r in self.rows.items()
            if n != self.node_id and r.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]

    def _table(self) -> HeartbeatTable:
        # Dead rows are not gossiped: a stale copy must not bring a dead node back.
        entries = tuple(
            HeartbeatEntry(n, r.generation, r.heartbeat, r.state is MemberState.LEFT)
            for n, r in self.rows.items()
            if r.state is not MemberState.DEAD and r.heartbeat >= 0
        )
        return HeartbeatTable(self.node_id, self.round, entries)

    # -- merging a peer's table -----------------------------------------------------------
    def _merge(self, e: HeartbeatEntry, sender: NodeId, now: float, effects: Effects) -> None:
        row = self.rows.get(e.node)
        if e.node == self.node_id:
            if row is not None and e.generation > row.generation and not e.left:
                # Peers hold a later life of ours than we know (a clock step back on
                # restart): move past it, so our beats count again.
                row.generation = e.generation + 1
            return
        if row is None:
            if len(self.rows) >= self.config.max_members:
                return
            state = MemberState.LEFT if e.left else MemberState.ALIVE
            self.rows[e.node] = _Row(e.generation, e.heartbeat, now, state)
            self._ring = None
            effects.events.append(("member", e.node, state.value, (e.generation, e.heartbeat)))
            return
        version = (e.generation, e.heartbeat)
        if e.left:
            if version >= row.version and row.state is not MemberState.LEFT:
                row.generation, row.heartbeat = version
                self._change(e.node, row, MemberEvent.LEAVE, effects)
            return
        if version <= row.version:
            return
        if row.state in (MemberState.DEAD, MemberState.LEFT) and not self._rejoined(e, row, sender):
            return
        row.generation, row.heartbeat = version
        row.updated_at = now
        self._misses.pop(e.node, None)
        if row.state is not MemberState.ALIVE:
            self._change(e.node, row, MemberEvent.ALIVE_NEWER, effects)

    def _rejoined(self, e: HeartbeatEntry, row: _Row, sender: NodeId) -> bool:
        """A dead member is readmitted on a new life, on its own word, or on a heartbeat so
        far past ours that it must have kept beating after we gave up on it (a stale
        copy still in flight is at most a few beats ahead)."""
        if e.generation > row.generation or sender == e.node:
            return True
        margin = max(2, int(self.fail_after() / self.config.interval / 2))
        return e.heartbeat >= row.heartbeat + margin

    def _change(self, node: NodeId, row: _Row, event: MemberEvent, effects: Effects) -> None:
        new = next_state(row.state, event)
        if new is None:
            return
        changed = new is not row.state
        row.state = new
        if changed:
            effects.events.append(("member", node, new.value, row.version))

    # -- deadlines ---------------------------------------------------------------------
    def _check_deadlines(self, now: float, effects: Effects) -> None:
        t_fail = self.fail_after()
        t_suspect = t_fail * self.config.suspect_fraction
        for node, row in self.rows.items():
            if node == self.node_id:
                continue
            silent = now - row.updated_at
            if row.state is MemberState.ALIVE and silent >= t_suspect:
                self._change(node, row, MemberEvent.SUSPECT, effects)
            if row.state is MemberState.SUSPECT and silent >= t_fail:
                self._change(node, row, MemberEvent.TIMEOUT, effects)
        if self.protocol == "sequence-check":
            self._check_due(now, effects)

    # -- sequence check ------------------------------------------------------------------
    def _period(self) -> float:
        """How often a given sender's table is due here: once per N-1 of its rounds."""
        return max(1, len(self.rows) - 1) * self.config.interval

    def _sequence(self, sender: NodeId, rnd: int, now: float, effects: Effects) -> None:
        if sender not in self.rows:
            return
        last = self._last_round.get(sender)
        every = max(1, len(self.rows) - 1)
        if last is not None and rnd - last > every:
            missing = (rnd - last) // every - 1
            if missing > 0:
                self.lost_messages += missing
                effects.events.append(("gap", sender, missing))
        self._last_round[sender] = rnd
        self._due[sender] = now + self._period()
        self._misses[sender] = 0

    def _check_due(self, now: float, effects: Effects) -> None:
        period = self._period()
        slack = self.config.interval
        for sender, due in self._due.items():
            if now <= due + slack:
                continue
            self._due[sender] = due + period
            misses = self._misses.get(sender, 0) + 1
            self._misses[sender] = misses
            row = self.rows.get(sender)
            if (
                row is not None
                and row.state is MemberState.ALIVE
                and misses >= self.config.miss_limit
                and now - row.updated_at >= period
            ):
                self._change(sender, row, MemberEvent.SUSPECT, effects)
