"""The heartbeat-gossip protocols of Ranganathan, George, Todd and Chidester (2001), as
one sans-IO core that differs in whom a node sends its table to each round and in how
a failure is decided.

Every `interval` a node bumps its own heartbeat and sends its whole table to one peer:
  random              a random live peer (van Renesse, Minsky, Hayden 1998)
  round-robin         in round r, node i sends to i + r mod N (r = 1..N-1, cyclic)
  binary-round-robin  in round r, node i sends to i + 2^(r-1) mod N (r = 1..ceil(log2 N))
  sequence-check      round-robin on rounds every member counts alike, r = floor(t /
                      interval) (the clock SWIM's probe slots use): each node knows which
                      sender owes it a table in each round, the table carries the
                      sender's round (its sequence number), and a missed one is evidence
                      before T_fail: a sender that missed its round and has been silent
                      for the suspicion time (half of T_fail) is declared dead at once,
                      one silent for dissemination_rounds + 1 rounds is suspected.
  consensus           sequence-check's rounds and suspicions, and the paper's distributed
                      consensus instead of each node's own timeout: every row carries its
                      node's suspect list (the suspect matrix, merged row by row with
                      the heartbeat that versions it), a node declares a failure only once
                      every member it does not suspect suspects it too (with nobody else
                      unsuspected, after T_fail), and sends the verdict to every member
                      (who accepts it unless it holds newer life).
A member whose heartbeat has not grown for `suspect_fraction` of T_fail is suspect, for
T_fail dead (not under consensus). T_fail scales with how many rounds a table takes to
reach everyone at the current N (`dissemination_rounds`), as van Renesse et al. choose
it from N.

Every protocol forgets dead and left members after `reap_after` (keeping a tombstone,
so that a stale copy cannot bring an old life back, and tries the forgotten dead now
and then, Serf's reconnect), lets a full table make room for a newcomer by forgetting
the member down the longest, asks a few peers for their tables when it (re)starts and
asks again, waiting twice as long each time, until one table shows it known; and a node
that finds it was stopped (no event for `stall_after` rounds) does not count the time
it lost as anyone's silence.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twlb.gossip.membership import MemberEvent, MemberState, is_down, next_state
from twlb.gossip.messages import HeartbeatEntry, HeartbeatTable, Verdict

from twlb.protocol import ClientRequest, Effects, NodeId

HEARTBEAT_PROTOCOLS = (
    "random",
    "round-robin",
    "binary-round-robin",
    "sequence-check",
    "consensus",
)
#: protocols whose rounds every member counts alike (the expected sender is known)
SLOTTED = ("sequence-check", "consensus")
ROUND_ROBIN = ("round-robin", *SLOTTED)


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
    if protocol in ROUND_ROBIN:
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
    #: sequence-check and consensus: a sender that missed its table is suspected once
    #: silent for dissemination_rounds(N) + this many rounds
    miss_slack: int = 1
    reap_after: float = 30.0  # dead and left members are forgotten after this
    reconnect_interval: float = 10.0  # try a failed member now and then (Serf)
    reconnect_timeout: float = 86_400.0  # how long a forgotten failed member is tried
    join_seeds: int = 3  # peers asked for their tables at start (0: a formed cluster)
    join_retry: float = 0.5  # an unanswered join is retried after this, doubling
    stall_after: float = 2.0  # rounds without any event: we were stopped
    max_members: int = 4096  # living members never grow past this, whatever peers send

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
    changed_at: float = 0.0
    suspects: frozenset[NodeId] = frozenset()  # consensus: its suspect list at this beat

    @property
    def version(self) -> tuple[int, int]:
        return (self.generation, self.heartbeat)


@dataclass(frozen=True, slots=True)
class _Tombstone:
    state: MemberState
    version: tuple[int, int]
    at: float


@dataclass(slots=True)
class _Join:
    wait: float
    due: float
    done: bool = False


@dataclass(slots=True)
class _Sequence:
    """sequence-check: per sender, the last round heard from it directly."""

    heard: dict[NodeId, int] = field(default_factory=dict)
    missed: dict[NodeId, int] = field(default_factory=dict)  # misses in a row


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
        self.tombstones: OrderedDict[NodeId, _Tombstone] = OrderedDict()
        self._seeds = [p for p in peers if p != node_id]
        self._ring: list[NodeId] | None = None
        self.round = 0
        self._next_round = 0.0
        self._left = False
        self._seq = _Sequence()
        self._join = _Join(self.config.join_retry, math.inf, done=True)
        self._reconnect_at = math.inf
        self._last_active: float | None = None
        # added to `now` to count rounds in a clock the members share (the live agent:
        # wall-clock time; its `now` is the event loop's monotonic time)
        self.clock_offset = 0.0
        self.lost_messages = 0

    @property
    def slotted(self) -> bool:
        return self.protocol in SLOTTED

    # -- the contract ---------------------------------------------------------------
    def start(self, now: float) -> Effects:
        cfg = self.config
        self._last_active = now
        self.rows[self.node_id] = _Row(cfg.generation, 0, now, MemberState.ALIVE, now)
        for peer in self._seeds[: cfg.max_members - 1]:
            self.rows[peer] = _Row(-1, -1, now, MemberState.ALIVE, now)
        self._ring = None
        if self.slotted:
            self._next_round = self._round_start(self._round_at(now) + 1)
        else:
            self._next_round = now + cfg.interval
        self._reconnect_at = now + cfg.reconnect_interval * self.rng.uniform(0.5, 1.5)
        effects = Effects(wake_at=self._next_round, events=[("generation", cfg.generation)])
        if cfg.join_seeds > 0 and self._ask_to_join(effects):
            self._join = _Join(cfg.join_retry, now + cfg.join_retry)
        return effects

    def on_timer(self, now: float) -> Effects:
        effects = Effects()
        if self._left:
            return effects
        self._observe(now, effects)
        if now >= self._next_round - 1e-9:
            self._gossip_round(now, effects)
            if self.slotted:
                self._next_round = self._round_start(self.round + 1)
            else:
                self._next_round = max(self._next_round + self.config.interval, now + 1e-9)
        self._check_deadlines(now, effects)
        self._housekeeping(now, effects)
        effects.wake_at = self._next_round
        return effects

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        effects = Effects()
        if self._left or self._last_active is None:  # not started: nothing to hear with
            return effects
        self._observe(now, effects)
        if isinstance(message, Verdict):
            if self.protocol == "consensus":  # no other protocol takes a peer's verdict
                self._on_verdict(message, now, effects)
            return effects
        if not isinstance(message, HeartbeatTable):
            return effects
        for entry in message.entries[: self.config.max_members]:
            self._merge(entry, message.sender, now, effects)
        if self.slotted and self._expected_sender(message.round) == message.sender:
            self._sequence(message.sender, message.round, effects)  # its scheduled table
        if message.join and message.sender in self.rows:
            effects.send.append((message.sender, self._table()))
        if self.protocol == "consensus":
            self._seek_consensus(now, effects)
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

    def forgotten(self) -> list[tuple[NodeId, MemberState, tuple[int, int]]]:
        return sorted((n, t.state, t.version) for n, t in self.tombstones.items())

    def fail_after(self) -> float:
        return self.config.fail_after(self.protocol, len(self.rows))

    def suspects(self) -> frozenset[NodeId]:
        """This node's row of the suspect matrix: the members it suspects, and those it
        holds failed (until it forgets them), so that a member that joins after a
        verdict still finds everyone agreeing."""
        return frozenset(
            n
            for n, r in self.rows.items()
            if r.state is MemberState.SUSPECT or r.state is MemberState.DEAD
        )

    # -- rounds -------------------------------------------------------------------------
    def _round_at(self, now: float) -> int:
        """The shared round `now` falls in (a timer due on a boundary may fire a hair
        early in floating point: it still counts as the new round)."""
        return math.floor((now + self.clock_offset) / self.config.interval + 1e-6)

    def _round_start(self, r: int) -> float:
        return r * self.config.interval - self.clock_offset

    def _observe(self, now: float, effects: Effects) -> None:
        """A gap with no event at all (a round fires every interval) means this process
        was stopped: the time it lost is nobody's silence."""
        last, self._last_active = self._last_active, now
        cfg = self.config
        if last is None or now - last <= cfg.stall_after * cfg.interval:
            return
        lost = now - last - cfg.interval
        for node, row in self.rows.items():
            if node != self.node_id:
                row.updated_at = min(now, row.updated_at + lost)
        effects.events.append(("stall", round(lost, 6)))

    def _gossip_round(self, now: float, effects: Effects) -> None:
        me = self.rows[self.node_id]
        me.heartbeat += 1
        me.updated_at = now
        if self.slotted:
            self.round = self._round_at(now)
            self._check_expected(self.round - 1, now, effects)
        else:
            self.round += 1
        target = self._target()
        if target is not None:
            effects.send.append((target, self._table()))
        if self.protocol == "consensus":
            self._seek_consensus(now, effects)

    def _offset(self, n: int) -> int:
        if self.protocol == "binary-round-robin":
            k = max(1, math.ceil(math.log2(n)))
            return 1 << ((self.round - 1) % k)
        if self.slotted:
            return 1 + self.round % (n - 1)
        return 1 + (self.round - 1) % (n - 1)

    def _target(self) -> NodeId | None:
        if self.protocol == "random":
            live = self._live_peers()
            return self.rng.choice(live) if live else None
        ring = self._sorted_ring()
        n = len(ring)
        if n < 2:
            return None
        return ring[(ring.index(self.node_id) + self._offset(n)) % n]

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

    def _table(self, join: bool = False) -> HeartbeatTable:
        # Dead rows are not gossiped: a stale copy must not bring a dead node back.
        consensus = self.protocol == "consensus"
        mine = tuple(sorted(self.suspects())) if consensus else ()
        entries = tuple(
            HeartbeatEntry(
                n,
                r.generation,
                r.heartbeat,
                r.state is MemberState.LEFT,
                (mine if n == self.node_id else tuple(sorted(r.suspects))) if consensus else (),
            )
            for n, r in self.rows.items()
            if r.state is not MemberState.DEAD and r.heartbeat >= 0
        )
        return HeartbeatTable(self.node_id, self.round, entries, join)

    # -- joining, reconnecting, forgetting -----------------------------------------------
    def _ask_to_join(self, effects: Effects) -> bool:
        peers = self._live_peers()
        chosen = self.rng.sample(peers, min(self.config.join_seeds, len(peers)))
        table = self._table(join=True)
        effects.send.extend((p, table) for p in chosen)
        return bool(chosen)

    def _housekeeping(self, now: float, effects: Effects) -> None:
        cfg = self.config
        join = self._join
        if not join.done and now >= join.due:
            self._ask_to_join(effects)
            join.wait = min(2 * join.wait, cfg.reconnect_interval)
            join.due = now + join.wait
        if now >= self._reconnect_at:
            self._reconnect_at = now + cfg.reconnect_interval
            self._reconnect(effects)
        for node in [
            n
            for n, r in self.rows.items()
            if is_down(r.state) and n != self.node_id and now - r.changed_at >= cfg.reap_after
        ]:
            self._forget(node, now)
            effects.events.append(("forgot", node))
        while self.tombstones:
            node, stone = next(iter(self.tombstones.items()))
            if now - stone.at < cfg.reconnect_timeout:
                break
            del self.tombstones[node]

    def _reconnect(self, effects: Effects) -> None:
        """Serf's reconnect: with probability failed / live, send our table to one failed
        member (a forgotten one too), so that a healed partition finds its way back."""
        dead = [n for n, r in self.rows.items() if r.state is MemberState.DEAD]
        dead += [n for n, t in self.tombstones.items() if t.state is MemberState.DEAD]
        live = max(1, len(self._live_peers()) + 1)
        if dead and self.rng.random() < len(dead) / live:
            effects.send.append((self.rng.choice(dead), self._table()))

    def _forget(self, node: NodeId, now: float) -> None:
        row = self.rows.pop(node)
        self.tombstones[node] = _Tombstone(row.state, row.version, now)
        self.tombstones.move_to_end(node)
        while len(self.tombstones) > self.config.max_members:
            self.tombstones.popitem(last=False)
        self._ring = None
        self._seq.heard.pop(node, None)
        self._seq.missed.pop(node, None)

    def _make_room(self, now: float) -> bool:
        """At the cap, forget the member down the longest; False if all are living."""
        if len(self.rows) < self.config.max_members:
            return True
        down = [
            (r.changed_at, n)
            for n, r in self.rows.items()
            if is_down(r.state) and n != self.node_id
        ]
        if not down:
            return False
        self._forget(min(down)[1], now)
        return True

    # -- merging a peer's table -----------------------------------------------------------
    def _merge(self, e: HeartbeatEntry, sender: NodeId, now: float, effects: Effects) -> None:
        row = self.rows.get(e.node)
        if e.node == self.node_id:
            if row is not None and e.generation > row.generation and not e.left:
                # Peers hold a later life of ours than we know (a clock step back on
                # restart): move past it, so our beats count again.
                row.generation = e.generation + 1
            if row is not None and e.generation >= row.generation and not self._join.done:
                self._join.done = True  # a table that knows this life of ours: joined
            return
        version = (e.generation, e.heartbeat)
        if row is None:
            stone = self.tombstones.get(e.node)
            if stone is not None and not self._rejoined(e, stone.version, sender):
                return
            if not self._make_room(now):
                return
            self.tombstones.pop(e.node, None)
            state = MemberState.LEFT if e.left else MemberState.ALIVE
            self.rows[e.node] = _Row(
                e.generation, e.heartbeat, now, state, now, frozenset(e.suspects)
            )
            self._ring = None
            effects.events.append(("member", e.node, state.value, version))
            return
        if e.left:
            if version >= row.version and row.state is not MemberState.LEFT:
                row.generation, row.heartbeat = version
                self._change(e.node, row, MemberEvent.LEAVE, now, effects)
            return
        if version <= row.version:
            return
        if is_down(row.state) and not self._rejoined(e, row.version, sender):
            return
        row.generation, row.heartbeat = version
        row.updated_at = now
        row.suspects = frozenset(e.suspects[: self.config.max_members])
        self._seq.missed.pop(e.node, None)
        if row.state is not MemberState.ALIVE:
            self._change(e.node, row, MemberEvent.ALIVE_NEWER, now, effects)

    def _rejoined(self, e: HeartbeatEntry, held: tuple[int, int], sender: NodeId) -> bool:
        """A dead member is readmitted on a new life, on its own word, or on a heartbeat so
        far past ours that it must have kept beating after we gave up on it (a stale
        copy still in flight is at most a few beats ahead)."""
        if e.generation > held[0] or sender == e.node:
            return True
        margin = max(2, int(self.fail_after() / self.config.interval / 2))
        return e.generation == held[0] and e.heartbeat >= held[1] + margin

    def _change(
        self, node: NodeId, row: _Row, event: MemberEvent, now: float, effects: Effects
    ) -> None:
        new = next_state(row.state, event)
        if new is None:
            return
        changed = new is not row.state
        row.state = new
        if changed:
            row.changed_at = now
            effects.events.append(("member", node, new.value, row.version))

    # -- deadlines ---------------------------------------------------------------------
    def _check_deadlines(self, now: float, effects: Effects) -> None:
        t_fail = self.fail_after()
        t_suspect = t_fail * self.config.suspect_fraction
        consensus = self.protocol == "consensus"
        for node, row in self.rows.items():
            if node == self.node_id:
                continue
            silent = now - row.updated_at
            if row.state is MemberState.ALIVE and silent >= t_suspect:
                self._change(node, row, MemberEvent.SUSPECT, now, effects)
            # under consensus only a seed never heard from in this life times out alone
            # (the others forgot a member that failed before we joined)
            own_timeout = not consensus or row.heartbeat < 0
            if own_timeout and row.state is MemberState.SUSPECT and silent >= t_fail:
                self._change(node, row, MemberEvent.TIMEOUT, now, effects)

    # -- sequence check -----------------------------------------------------------------
    def _sequence(self, sender: NodeId, rnd: int, effects: Effects) -> None:
        """A table heard from `sender` directly, sent in its round `rnd`: the gap since
        the last one counts the tables lost on the way (one is due every N-1 rounds)."""
        if sender not in self.rows:
            return
        seq = self._seq
        last = seq.heard.get(sender)
        every = max(1, len(self.rows) - 1)
        if last is not None and rnd - last > every:
            missing = (rnd - last) // every - 1
            if missing > 0:
                self.lost_messages += missing
                effects.events.append(("gap", sender, missing))
        if last is None or rnd > last:
            seq.heard[sender] = rnd
        seq.missed.pop(sender, None)

    def _expected_sender(self, r: int) -> NodeId | None:
        """Who owes us a table in round r: the member whose offset lands on us."""
        ring = self._sorted_ring()
        n = len(ring)
        if n < 2:
            return None
        return ring[(ring.index(self.node_id) - 1 - r % (n - 1)) % n]

    def _check_expected(self, r: int, now: float, effects: Effects) -> None:
        """At the start of round r + 1: did round r's sender's table arrive? A missed
        sequence number is evidence the sender may be down, which the sender's silence
        then confirms well before T_fail."""
        sender = self._expected_sender(r)
        if sender is None or sender == self.node_id:
            return
        row = self.rows.get(sender)
        if row is None or is_down(row.state) or self._seq.heard.get(sender, -1) >= r:
            return
        missed = self._seq.missed.get(sender, 0) + 1
        self._seq.missed[sender] = missed
        effects.events.append(("missed", sender, r))
        cfg = self.config
        n = len(self.rows)
        silent = now - row.updated_at
        t_suspect = self.fail_after() * cfg.suspect_fraction
        quick = cfg.interval * (dissemination_rounds(self.protocol, n) + cfg.miss_slack)
        if row.state is MemberState.ALIVE and silent >= quick:
            self._change(sender, row, MemberEvent.SUSPECT, now, effects)
        if self.protocol == "sequence-check" and silent >= t_suspect:
            self._change(sender, row, MemberEvent.SUSPECT, now, effects)
            self._change(sender, row, MemberEvent.TIMEOUT, now, effects)

    # -- consensus ----------------------------------------------------------------------
    def _seek_consensus(self, now: float, effects: Effects) -> None:
        """Declare each member we suspect failed once every member we do not suspect
        suspects it too (as its latest row we hold says), and tell everyone. With nobody
        left to agree with (every other member suspected or down), our own suspicion is
        all there is: then it takes T_fail's silence, as the other protocols do."""
        mine = [n for n, r in self.rows.items() if r.state is MemberState.SUSPECT]
        if not mine:
            return
        unsuspected = [
            r for n, r in self.rows.items() if n != self.node_id and r.state is MemberState.ALIVE
        ]
        t_fail = self.fail_after()
        for node in sorted(mine):
            alone = not unsuspected and now - self.rows[node].updated_at < t_fail
            if not alone and all(node in r.suspects for r in unsuspected):
                row = self.rows[node]
                self._change(node, row, MemberEvent.TIMEOUT, now, effects)
                verdict = Verdict(self.node_id, node, row.generation, row.heartbeat)
                effects.send.extend((n, verdict) for n in self._live_peers() if n != node)
                effects.events.append(("declared", node, row.version))

    def _on_verdict(self, v: Verdict, now: float, effects: Effects) -> None:
        """A member found consensus on `v.node`'s failure. Accepted unless we hold a newer
        life of it or newer beats that we do not doubt."""
        row = self.rows.get(v.node)
        if v.node == self.node_id or row is None or is_down(row.state):
            return
        version = (v.generation, v.heartbeat)
        if version >= row.version or (
            row.state is MemberState.SUSPECT and v.generation == row.generation
        ):
            self._change(v.node, row, MemberEvent.DEAD, now, effects)
