"""A replicated hash table in Dynamo's manner, as sans-IO protocol nodes.

Each key lives on its N home replicas: the first N distinct nodes clockwise from it on the
consistent-hash ring (`twlb.balancer.hashing.HashRing`, the ring the balancer routes
with; N is `replication_factor`). Any node coordinates a client's get, put or delete.

Versions are vector clocks, never a wall clock: a write's clock is the merge of every
clock its coordinator read for the key, with the coordinator's own counter (persisted,
so never reused) advanced. Concurrent writes (neither clock descends from the other) are
kept side by side as siblings; a write that read them supersedes them. A reader that
needs one value takes **the stated merge**: the sibling of the highest rank, rank being
(sum of the clock's counters, the clock): a total order that puts every write after each
write it descends from. A delete writes a tombstone.

Two modes, and what each promises (W write quorum, Rq read quorum):

- **strict** (the default; needs W + Rq > N): quorums count the key's home replicas only.
  A write first reads the clocks of Rq homes, then stores at the homes and answers once W
  homes acknowledged; a read asks the homes, takes the stated merge of Rq answers, and
  before answering writes that record back until W homes hold it. This is the ABD
  register with vector clocks: every key is linearizable (get, put, delete), and no
  acknowledged write is lost with up to N-1 of its homes down (it is on W homes' disks,
  and every read or write quorum meets them). With fewer than Rq (W) homes reachable an
  operation fails, it never answers from elsewhere.
- **sloppy** (`mode="sloppy"`): as Dynamo, a home that does not answer is replaced by the
  next healthy node on the ring, and that stand-in's answers and acknowledgements count
  toward the quorums. Always writable while W nodes are up; the weaker promise: no
  acknowledged write is lost (every one ends in the table, or superseded by a write that
  read it, or as a sibling) once the cluster heals and the hand-offs and anti-entropy
  below have run, but a read may return an older value than the last acknowledged write.

In both modes:
- **hinted hand-off**: a copy meant for a home that is down (suspected at the start of a
  write, or silent by its timeout) goes to a stand-in with a hint naming the home. The
  stand-in keeps hinted records on its own disk (`persistent_state`), apart from its own,
  and hands them to the home every `hint_interval` until the home acknowledges, so a
  hint survives the coordinator's crash and the stand-in's.
- **anti-entropy**: every `anti_entropy_interval` a node compares, with the next peer in
  turn, Merkle trees (`twlb.sim.merkle`) of the keys both replicate, walks down where they
  differ and exchanges only the records of differing leaves, so replicas converge without
  reads (and a home that missed a write whose coordinator crashed before any hint was made
  still gets it).
- **read repair**: a read that found a home stale writes the merged record back to it.
- Membership: a joining node announces itself and the others hand it the keys it now
  replicates; a leaving node hands its keys to the nodes that take over.

A write whose store phase ends without W acknowledgements may still take effect (it is on
some replicas, and a later read may find it): its coordinator does not answer (the client
times out: the outcome is unknown) and emits ("indeterminate", client, seq, detail). A
write whose read phase fails stored nothing and is refused (`ok=False`).

The nodes follow `twlb.protocol`: they read no clock and open no socket, and run on the
simulator's kernel (`twlb.sim.kernel`). The founding API: `create_dht(nodes,
replication_factor=2)` and a node's `put`, `get` and `delete`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from twlb.balancer.hashing import HashRing
from twlb.sim.kernel import Kernel
from twlb.sim.merkle import MerkleTree, Path, leaf_of
from twlb.sim.network import NetworkConfig

from twlb.protocol import ClientReply, ClientRequest, Effects, NodeId, Operation, OpKind

MODES = ("strict", "sloppy")
#: Deliberately broken variants (config `bug`), to show the checks can fail; each is one
#: of the ways an earlier version of this table broke its promise:
#:   "stand-in-acks"        in strict mode, writes take sloppy quorums (a stand-in's
#:                          answer and acknowledgement count) while reads ask the homes;
#:   "wall-clock-versions"  a write's version is its coordinator's clock reading alone,
#:                          so the latest clock wins (last writer wins by wall clock);
#:   "no-anti-entropy"      no Merkle-tree repair: a home that missed a write no hint
#:                          was made for (its coordinator crashed) never gets it.
DHT_BUGS = frozenset({"stand-in-acks", "wall-clock-versions", "no-anti-entropy"})


class DhtOp(StrEnum):
    """The table's operations (GET and PUT share their values with `OpKind`)."""

    GET = "get"
    PUT = "put"
    DELETE = "delete"
    LEAVE = "leave"  # administrative: the coordinator itself leaves the ring


# ---- versions ---------------------------------------------------------------------------

Clock = tuple[tuple[NodeId, int], ...]  # a vector clock: (node, counter) sorted by node


def merge_clocks(clocks: Iterable[Clock]) -> Clock:
    out: dict[NodeId, int] = {}
    for clock in clocks:
        for node, counter in clock:
            if counter > out.get(node, 0):
                out[node] = counter
    return tuple(sorted(out.items()))


def descends(a: Clock, b: Clock) -> bool:
    """Whether clock `a` has seen everything `b` has (a >= b, entry by entry)."""
    mine = dict(a)
    return all(mine.get(node, 0) >= counter for node, counter in b)


def rank(clock: Clock) -> tuple[int, Clock]:
    """The stated merge's total order: a clock ranks above every clock it descends from."""
    return sum(counter for _node, counter in clock), clock


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    value: Any
    clock: Clock
    deleted: bool = False

    @property
    def rank(self) -> tuple[int, Clock]:
        return rank(self.clock)


Siblings = tuple[Record, ...]  # concurrent records of one key, by rank


def reconcile(*groups: Iterable[Record]) -> Siblings:
    """The records of every group that no other record descends from (one per clock)."""
    by_clock: dict[Clock, Record] = {}
    for group in groups:
        for record in group:
            by_clock.setdefault(record.clock, record)
    kept = [
        r
        for r in by_clock.values()
        if not any(o.clock != r.clock and descends(o.clock, r.clock) for o in by_clock.values())
    ]
    return tuple(sorted(kept, key=lambda r: r.rank))


def resolve(siblings: Iterable[Record]) -> Record | None:
    """The stated merge: the sibling of the highest rank (None: no record)."""
    return max(siblings, key=lambda r: r.rank, default=None)


def covers(siblings: Iterable[Record], clock: Clock) -> bool:
    """Whether a write of `clock` is held here, or superseded by one that read it."""
    return any(descends(r.clock, clock) for r in siblings)


def digest(siblings: Iterable[Record]) -> bytes:
    h = hashlib.sha256()
    for r in sorted(siblings, key=lambda r: r.clock):
        h.update(repr((r.clock, r.deleted, r.value)).encode())
    return h.digest()


@dataclass(frozen=True, slots=True)
class DhtAnswer:
    """The value of an `ok` reply: the value read or written, the clock of its record
    (the context a client can compare versions by), and how many siblings there were."""

    value: Any
    clock: Clock
    siblings: int = 1


# ---- messages (immutable: the network may deliver one twice) ------------------------------


@dataclass(frozen=True, slots=True)
class Fetch:
    op_id: str
    key: str


@dataclass(frozen=True, slots=True)
class FetchReply:
    op_id: str
    key: str
    records: Siblings


@dataclass(frozen=True, slots=True)
class Store:
    op_id: str
    record: Record
    hint: NodeId | None = None  # the home this copy stands in for


@dataclass(frozen=True, slots=True)
class StoreAck:
    op_id: str
    key: str


@dataclass(frozen=True, slots=True)
class Handoff:
    """Records the receiver holds a replica of from now on (hinted hand-off, join, leave)."""

    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class HandoffAck:
    clocks: tuple[tuple[str, Clock], ...]


@dataclass(frozen=True, slots=True)
class TreeProbe:
    """Anti-entropy: digests of tree nodes (path, digest) over the keys both replicate."""

    nodes: tuple[tuple[Path, bytes], ...]


@dataclass(frozen=True, slots=True)
class LeafRecords:
    """Anti-entropy: the sender's records in leaves whose digests differ; `answer`: send
    yours for the same leaves back."""

    leaves: tuple[Path, ...]
    records: tuple[Record, ...]
    answer: bool


@dataclass(frozen=True, slots=True)
class Join:
    node: NodeId


@dataclass(frozen=True, slots=True)
class Leave:
    node: NodeId


@dataclass(frozen=True)
class DhtConfig:
    """Replication factor N, write quorum W, read quorum Rq (defaults: majorities of N)."""

    replication_factor: int = 2
    write_quorum: int | None = None
    read_quorum: int | None = None
    mode: str = "strict"
    vnodes: int = 32
    algorithm: str = "sha256"
    request_timeout: float = 0.5
    hint_interval: float = 0.5
    anti_entropy_interval: float = 1.0
    merkle_depth: int = 3
    merkle_fanout: int = 4
    joining: bool = False  # start() announces the node to its peers
    bug: str | None = None  # a deliberately broken variant: DHT_BUGS

    @property
    def w(self) -> int:
        return self.replication_factor // 2 + 1 if self.write_quorum is None else self.write_quorum

    @property
    def rq(self) -> int:
        return self.replication_factor // 2 + 1 if self.read_quorum is None else self.read_quorum

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    def __post_init__(self) -> None:
        n = self.replication_factor
        if n < 1:
            raise ValueError(f"replication_factor must be at least 1, got {n}")
        for name, q in (("write_quorum", self.w), ("read_quorum", self.rq)):
            if not 1 <= q <= n:
                raise ValueError(f"{name} must be in 1..{n} (the replication factor), got {q}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.strict and self.w + self.rq <= n:
            raise ValueError(
                f"strict mode needs write_quorum + read_quorum > replication_factor "
                f"({self.w} + {self.rq} <= {n}); use mode='sloppy' for weaker quorums"
            )
        if self.bug is not None and self.bug not in DHT_BUGS:
            raise ValueError(f"unknown dht bug {self.bug!r}; known: {', '.join(sorted(DHT_BUGS))}")
        for name in ("request_timeout", "hint_interval", "anti_entropy_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class _Pending:
    """One client operation at its coordinator."""

    request: ClientRequest
    kind: DhtOp
    key: str
    homes: list[NodeId]
    deadline: float
    phase: str = "read"  # read (clocks or values) | store (a write) | write-back (a read)
    targets: dict[NodeId, NodeId | None] = field(default_factory=dict)  # asked -> home stood for
    answers: dict[NodeId, Siblings] = field(default_factory=dict)
    record: Record | None = None  # what the store or write-back phase stores
    hinted: dict[NodeId, NodeId] = field(default_factory=dict)  # stand-in -> home, with a copy
    acks: set[NodeId] = field(default_factory=set)
    replied: bool = False
    extended: bool = False  # one more timeout after the silent homes' stand-ins were asked


class DhtNode:
    """One node of the replicated hash table (a `twlb.protocol.ProtocolNode`)."""

    def __init__(
        self,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: DhtConfig | Mapping[str, Any] | None = None,
    ) -> None:
        self.node_id = node_id
        if config is None or isinstance(config, Mapping):
            config = DhtConfig(**(config or {}))  # the kernel hands every node a mapping
        self.config = config
        self.rng = rng
        self.members: set[NodeId] = {node_id, *peers}
        self.ring = HashRing(self.config.vnodes, self.config.algorithm)
        self.ring.set_nodes(sorted(self.members))
        self._homes: dict[str, list[NodeId]] = {}
        # Persistent state.
        self.store: dict[str, Siblings] = {}
        self.hints: dict[NodeId, dict[str, Siblings]] = {}  # home -> key -> records
        self.counter = 0  # this node's entry in the clocks of the writes it coordinates
        self.left = False
        # Bumped at every recovery: operation ids never repeat across crashes, so a late
        # answer to an operation of a dead incarnation is never taken for a new one's.
        self.incarnation = 0
        # Volatile state.
        self.suspected: set[NodeId] = set()
        self._ops = 0
        self._pending: dict[str, _Pending] = {}
        self._next_hints = 0.0
        self._next_sync = 0.0
        self._sync_turn = 0

    # ---- placement ------------------------------------------------------------------------
    def preference(self, key: str) -> list[NodeId]:
        """The key's N home replicas: the first N distinct members clockwise from it."""
        homes = self._homes.get(key)
        if homes is None:
            homes = self._homes[key] = self.ring.successors(key, self.config.replication_factor)
        return homes

    def _membership_changed(self) -> None:
        self._homes.clear()

    def _stand_ins(self, key: str, *busy: Iterable[NodeId]) -> list[NodeId]:
        """Nodes after the homes on the ring, not suspected and not already asked."""
        skip = set(self.preference(key)).union(*busy) | self.suspected
        return [n for n in self.ring.successors(key, len(self.members)) if n not in skip]

    def lookup(self, key: str) -> Siblings:
        """Every record this node holds for `key`, its own and hinted, reconciled."""
        return reconcile(self.store.get(key, ()), *(h.get(key, ()) for h in self.hints.values()))

    def value(self, key: str) -> Any:
        """The value this node would answer alone (the stated merge of what it holds)."""
        best = resolve(self.lookup(key))
        return None if best is None or best.deleted else best.value

    def _keep(self, record: Record, hint: NodeId | None = None) -> bool:
        """Store a record (as a hint for `hint`); whether anything changed."""
        if hint is not None and hint != self.node_id:
            bucket = self.hints.setdefault(hint, {})
            before = bucket.get(record.key, ())
            bucket[record.key] = reconcile(before, (record,))
            return bucket[record.key] != before
        before = self.store.get(record.key, ())
        self.store[record.key] = reconcile(before, (record,))
        return self.store[record.key] != before

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, now: float) -> Effects:
        cfg = self.config
        # Spread the periodic rounds so that nodes do not all sync at the same instant.
        self._next_hints = now + cfg.hint_interval * (0.5 + self.rng.random())
        self._next_sync = now + cfg.anti_entropy_interval * (0.5 + self.rng.random())
        fx = Effects(wake_at=min(self._next_hints, self._next_sync))
        if cfg.joining:
            fx.send += [(p, Join(self.node_id)) for p in sorted(self.members - {self.node_id})]
            fx.events.append(("join", self.node_id))
        return fx

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        fx = Effects()
        op = request.op
        try:
            kind = DhtOp(str(op.kind))
        except ValueError:
            fx.replies.append(
                ClientReply(request.client, request.seq, False, error=f"unsupported {op.kind}")
            )
            return fx
        if self.left:
            fx.replies.append(
                ClientReply(request.client, request.seq, False, error="node has left")
            )
            return fx
        if kind is DhtOp.LEAVE:
            fx.merge(self.leave(now))
            fx.replies.append(ClientReply(request.client, request.seq, True))
            return fx
        self._clamp(now)
        self._ops += 1
        op_id = f"{self.node_id}:{self.incarnation}:{self._ops}"
        homes = list(self.preference(op.key))
        p = _Pending(request, kind, op.key, homes, now + self.config.request_timeout)
        self._pending[op_id] = p
        # Read phase: the values (a get) or the clocks (a put or delete) of the homes; in
        # sloppy mode a suspected home's stand-in is asked in its place.
        p.targets = {h: None for h in homes}
        if not self._strict_for(p):
            for h in homes:
                if h in self.suspected and h != self.node_id:
                    spare = self._stand_ins(op.key, p.targets)
                    if spare:
                        del p.targets[h]
                        p.targets[spare[0]] = h
        for target in p.targets:
            if target == self.node_id:
                p.answers[target] = self.lookup(op.key)
            else:
                fx.send.append((target, Fetch(op_id, op.key)))
        fx.merge(self._progress(op_id, p, now))
        fx.wake_at = self._next_wake()
        return fx

    # ---- the coordinator's phases -----------------------------------------------------------
    def _counts(self, p: _Pending, node: NodeId) -> bool:
        """Whether `node`'s answer (read phase) or acknowledgement (store, write-back)
        counts toward the quorum: in strict mode a home's only; in sloppy mode a
        stand-in's too."""
        if node in p.homes:
            return True
        if self._strict_for(p):
            return False
        return node in (p.targets if p.phase == "read" else p.hinted)

    def _strict_for(self, p: _Pending) -> bool:
        if self.config.bug == "stand-in-acks" and p.kind is not DhtOp.GET:
            return False  # the broken variant: writes take sloppy quorums, reads strict ones
        return self.config.strict

    def _progress(self, op_id: str, p: _Pending, now: float) -> Effects:
        fx = Effects()
        cfg = self.config
        if p.phase == "read":
            counted = [n for n in p.answers if self._counts(p, n)]
            if len(counted) < cfg.rq:
                return fx
            if p.kind is DhtOp.GET:
                best = resolve(reconcile(*p.answers.values()))
                if best is None:
                    fx.replies.append(self._answer(p, None))
                    self._pending.pop(op_id, None)
                    return fx
                p.record = best
                if not cfg.strict:
                    fx.replies.append(self._answer(p, best))
                fx.merge(self._write_back(op_id, p, now))
            else:
                fx.merge(self._store_phase(op_id, p, now))
            return fx
        # store or write-back: answer once W count
        counted = [n for n in p.acks if self._counts(p, n)]
        if not p.replied and len(counted) >= cfg.w:
            fx.replies.append(self._answer(p, p.record))
            if p.kind is not DhtOp.GET and p.record is not None:
                fx.events.append(("write", p.key, p.record.clock))
        if p.replied and set(p.homes) <= p.acks:
            self._pending.pop(op_id, None)
        return fx

    def _answer(self, p: _Pending, record: Record | None) -> ClientReply:
        p.replied = True
        siblings = len(reconcile(*p.answers.values())) if p.kind is DhtOp.GET else 1
        if record is None:
            answer = DhtAnswer(None, (), 0)
        else:
            answer = DhtAnswer(None if record.deleted else record.value, record.clock, siblings)
        return ClientReply(p.request.client, p.request.seq, True, answer)

    def _store_phase(self, op_id: str, p: _Pending, now: float) -> Effects:
        """A put or delete: a clock above every clock read, then store at the homes."""
        op = p.request.op
        self.counter += 1  # persisted with the store: never reused after a crash
        seen = merge_clocks(r.clock for rs in p.answers.values() for r in rs)
        mine = dict(seen)
        mine[self.node_id] = max(mine.get(self.node_id, 0), self.counter)
        self.counter = mine[self.node_id]
        clock: Clock = tuple(sorted(mine.items()))
        if self.config.bug == "wall-clock-versions":
            clock = ((self.node_id, int(now * 1_000_000)),)
        deleted = p.kind is DhtOp.DELETE
        p.record = Record(p.key, None if deleted else op.value, clock, deleted)
        p.phase = "store"
        p.deadline = now + self.config.request_timeout
        p.extended = False
        fx = self._send_copies(op_id, p, p.homes)
        fx.merge(self._progress(op_id, p, now))
        return fx

    def _write_back(self, op_id: str, p: _Pending, now: float) -> Effects:
        """A read's record goes back to every home that did not show it (read repair); in
        strict mode the read answers only once W homes hold it."""
        assert p.record is not None
        p.phase = "write-back"
        p.deadline = now + self.config.request_timeout
        p.extended = False
        for node, records in p.answers.items():
            if any(r.clock == p.record.clock for r in records) and node in p.homes:
                p.acks.add(node)
        stale = [h for h in p.homes if h not in p.acks]
        fx = self._send_copies(op_id, p, stale)
        for node in stale:
            if node in p.answers:
                fx.events.append(("read-repair", node, p.key))
        fx.merge(self._progress(op_id, p, now))
        return fx

    def _send_copies(self, op_id: str, p: _Pending, homes: Iterable[NodeId]) -> Effects:
        """Store `p.record` at these homes; a suspected home's copy also goes at once to
        a stand-in, with a hint naming it."""
        fx = Effects()
        assert p.record is not None
        for home in homes:
            if home == self.node_id:
                self._keep(p.record)
                p.acks.add(home)
                continue
            fx.send.append((home, Store(op_id, p.record)))
            if home in self.suspected:
                fx.merge(self._hint(op_id, p, home))
        return fx

    def _hint(self, op_id: str, p: _Pending, home: NodeId) -> Effects:
        fx = Effects()
        assert p.record is not None
        if home in p.hinted.values():
            return fx  # a stand-in was sent this home's copy already
        spare = self._stand_ins(p.key, p.hinted)
        if not spare:
            return fx  # nobody left to stand in: anti-entropy repairs the home later
        stand_in = spare[0]
        p.hinted[stand_in] = home
        if stand_in == self.node_id:
            self._keep(p.record, home)
            p.acks.add(stand_in)
        else:
            fx.send.append((stand_in, Store(op_id, p.record, home)))
        fx.events.append(("hint", stand_in, home, p.key))
        return fx

    def _expire(self, op_id: str, p: _Pending, now: float) -> Effects:
        """A phase's deadline passed: suspect the silent homes, ask their stand-ins once,
        then give up."""
        fx = Effects()
        cfg = self.config
        heard = p.answers if p.phase == "read" else p.acks
        silent = [h for h in p.homes if h not in heard and h != self.node_id]
        for h in silent:
            if h not in self.suspected:
                self.suspected.add(h)
                fx.events.append(("suspect", h))
        if not p.extended and silent:
            p.extended = True
            p.deadline = now + cfg.request_timeout
            for h in silent:
                if p.phase == "read":
                    if not self._strict_for(p):  # a stand-in's answer counts only if sloppy
                        spare = self._stand_ins(p.key, p.targets)
                        if spare:
                            p.targets[spare[0]] = h
                            fx.send.append((spare[0], Fetch(op_id, p.key)))
                else:
                    fx.merge(self._hint(op_id, p, h))
            return fx
        if p.replied:  # a read answered in sloppy mode, or a write whose repair lags
            self._pending.pop(op_id, None)
            return fx
        if p.phase == "read":
            counted = sum(1 for n in p.answers if self._counts(p, n))
            fx.replies.append(
                ClientReply(
                    p.request.client,
                    p.request.seq,
                    False,
                    error=f"quorum not reached: {counted} of {cfg.rq} replicas answered",
                )
            )
        elif p.kind is DhtOp.GET:
            counted = sum(1 for n in p.acks if self._counts(p, n))
            fx.replies.append(
                ClientReply(
                    p.request.client,
                    p.request.seq,
                    False,
                    error=f"quorum not reached: the value read is on {counted} of {cfg.w} replicas",
                )
            )
        else:
            counted = sum(1 for n in p.acks if self._counts(p, n))
            detail = (
                f"quorum not reached: {counted} of {cfg.w} replicas acknowledged; "
                "the write may still take effect"
            )
            fx.events.append(("indeterminate", p.request.client, p.request.seq, detail))
        self._pending.pop(op_id, None)
        return fx

    # ---- messages -------------------------------------------------------------------------
    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        fx = Effects()
        self._clamp(now)
        self.suspected.discard(src)
        if isinstance(message, Fetch):
            fx.send.append((src, FetchReply(message.op_id, message.key, self.lookup(message.key))))
        elif isinstance(message, FetchReply):
            p = self._pending.get(message.op_id)
            if p is not None and p.phase == "read" and src in p.targets:
                p.answers[src] = message.records
                fx.merge(self._progress(message.op_id, p, now))
        elif isinstance(message, Store):
            self._keep(message.record, message.hint)
            fx.send.append((src, StoreAck(message.op_id, message.record.key)))
        elif isinstance(message, StoreAck):
            p = self._pending.get(message.op_id)
            if p is not None and p.phase != "read" and (src in p.homes or src in p.hinted):
                p.acks.add(src)
                fx.merge(self._progress(message.op_id, p, now))
        elif isinstance(message, Handoff):
            for r in message.records:
                self._keep(r)
            fx.send.append((src, HandoffAck(tuple((r.key, r.clock) for r in message.records))))
            if message.records:
                fx.events.append(("handoff-in", src, len(message.records)))
        elif isinstance(message, HandoffAck):
            fx.merge(self._handed_off(src, message.clocks))
        elif isinstance(message, TreeProbe):
            fx.merge(self._on_probe(src, message))
        elif isinstance(message, LeafRecords):
            fx.merge(self._on_leaf_records(src, message))
        elif isinstance(message, Join):
            fx.merge(self._on_join(message.node))
        elif isinstance(message, Leave):
            fx.merge(self._on_leave(message.node))
        fx.wake_at = self._next_wake()  # the clamp may have brought a round forward
        return fx

    def _clamp(self, now: float) -> None:
        """A clock set back must not postpone the periodic rounds (or a deadline) by the
        size of the jump: nothing waits longer than its interval from the reading now."""
        cfg = self.config
        self._next_hints = min(self._next_hints, now + cfg.hint_interval)
        self._next_sync = min(self._next_sync, now + cfg.anti_entropy_interval)
        for p in self._pending.values():
            p.deadline = min(p.deadline, now + cfg.request_timeout)

    def on_timer(self, now: float) -> Effects:
        fx = Effects()
        self._clamp(now)
        for op_id, p in list(self._pending.items()):
            if now >= p.deadline:
                fx.merge(self._expire(op_id, p, now))
        if now >= self._next_hints:
            self._next_hints = now + self.config.hint_interval
            fx.merge(self._hand_off_hints())
        if now >= self._next_sync:
            self._next_sync = now + self.config.anti_entropy_interval
            if self.config.bug != "no-anti-entropy":
                fx.merge(self._start_sync())
        fx.wake_at = self._next_wake()
        return fx

    def _next_wake(self) -> float:
        return min(
            [self._next_hints, self._next_sync, *(p.deadline for p in self._pending.values())]
        )

    # ---- hinted hand-off ------------------------------------------------------------------
    def _hand_off_hints(self) -> Effects:
        fx = Effects()
        for home, bucket in sorted(self.hints.items()):
            if home in self.members and bucket:
                records = tuple(r for rs in bucket.values() for r in rs)
                fx.send.append((home, Handoff(records)))
        # An empty hand-off is a probe: the answer clears the suspicion.
        for n in sorted(self.suspected & self.members - self.hints.keys()):
            fx.send.append((n, Handoff(())))
        return fx

    def _handed_off(self, src: NodeId, clocks: Iterable[tuple[str, Clock]]) -> Effects:
        """`src` holds these records now: drop the hints for it, and the keys no longer
        ours (after a join or our leave) that it has taken."""
        fx = Effects()
        acked: dict[str, list[Clock]] = {}
        for key, clock in clocks:
            acked.setdefault(key, []).append(clock)
        bucket = self.hints.get(src, {})
        for key, got in acked.items():
            for table in (bucket, self.store):
                if key not in table:
                    continue
                if table is self.store and self.node_id in self.preference(key) and not self.left:
                    continue  # still ours
                rest = tuple(r for r in table[key] if not any(descends(c, r.clock) for c in got))
                if rest:
                    table[key] = rest
                else:
                    del table[key]
        if src in self.hints and not bucket:
            del self.hints[src]
        if self.left and not self.store and not self.hints:
            fx.events.append(("left", self.node_id))
        return fx

    # ---- anti-entropy ---------------------------------------------------------------------
    def _tree(self, peer: NodeId) -> MerkleTree:
        """The tree of the keys this node and `peer` both replicate, by this node's ring."""
        items = [
            (key, digest(records))
            for key, records in self.store.items()
            if peer in self.preference(key) and self.node_id in self.preference(key)
        ]
        return MerkleTree(items, self.config.merkle_depth, self.config.merkle_fanout)

    def _start_sync(self) -> Effects:
        fx = Effects()
        peers = sorted(self.members - {self.node_id})
        if not peers or self.left:
            return fx
        peer = peers[self._sync_turn % len(peers)]
        self._sync_turn += 1
        root: tuple[Path, bytes] = ((), self._tree(peer).digest(()))
        fx.send.append((peer, TreeProbe((root,))))
        return fx

    def _on_probe(self, src: NodeId, probe: TreeProbe) -> Effects:
        fx = Effects()
        if src not in self.members or self.left:
            return fx
        tree = self._tree(src)
        deeper: list[tuple[Path, bytes]] = []
        leaves: list[Path] = []
        for path, theirs in probe.nodes:
            if tree.digest(path) == theirs:
                continue
            if tree.is_leaf(path):
                leaves.append(path)
            else:
                deeper.extend(tree.children(path))
        if deeper:
            fx.send.append((src, TreeProbe(tuple(deeper))))
        if leaves:
            fx.send.append((src, self._leaf_records(src, leaves, answer=True)))
        return fx

    def _leaf_records(self, peer: NodeId, leaves: Sequence[Path], answer: bool) -> LeafRecords:
        cfg = self.config
        wanted = set(leaves)
        records = tuple(
            r
            for key, rs in sorted(self.store.items())
            if peer in self.preference(key)
            and self.node_id in self.preference(key)
            and leaf_of(key, cfg.merkle_depth, cfg.merkle_fanout) in wanted
            for r in rs
        )
        return LeafRecords(tuple(leaves), records, answer)

    def _on_leaf_records(self, src: NodeId, message: LeafRecords) -> Effects:
        fx = Effects()
        repaired = 0
        for r in message.records:
            if self.node_id in self.preference(r.key):
                repaired += self._keep(r)
        if repaired:
            fx.events.append(("anti-entropy", src, repaired))
        if message.answer:
            fx.send.append((src, self._leaf_records(src, message.leaves, answer=False)))
        return fx

    # ---- membership -----------------------------------------------------------------------
    def _send_to_owners(self, records: Iterable[Record], only_new: NodeId | None = None) -> Effects:
        """Handoff messages giving each record to its current homes (other than this
        node; with `only_new`, to that node only when it is one of them)."""
        batches: dict[NodeId, list[Record]] = {}
        for r in records:
            for n in self.preference(r.key):
                if n != self.node_id and (only_new is None or n == only_new):
                    batches.setdefault(n, []).append(r)
        fx = Effects()
        for n, rs in sorted(batches.items()):
            fx.send.append((n, Handoff(tuple(rs))))
            fx.events.append(("handoff-out", n, len(rs)))
        return fx

    def _on_join(self, node: NodeId) -> Effects:
        if node in self.members:
            return Effects()
        self.members.add(node)
        self.ring.add(node)
        self._membership_changed()
        return self._send_to_owners([r for rs in self.store.values() for r in rs], only_new=node)

    def _on_leave(self, node: NodeId) -> Effects:
        if node not in self.members or node == self.node_id:
            return Effects()
        self.members.discard(node)
        self.suspected.discard(node)
        self.ring.remove(node)
        self._membership_changed()
        # Hints kept for a node that is gone belong to whoever replicates the key now.
        orphans = [r for rs in self.hints.pop(node, {}).values() for r in rs]
        for r in orphans:
            if self.node_id in self.preference(r.key):
                self._keep(r)
        return self._send_to_owners(orphans)

    def leave(self, now: float) -> Effects:
        """Leave the ring: tell every peer, and hand each key to the nodes that take it over."""
        records = [r for rs in self.store.values() for r in rs] + [
            r for b in self.hints.values() for rs in b.values() for r in rs
        ]
        self.members.discard(self.node_id)
        self.ring.remove(self.node_id)
        self._membership_changed()
        self.left = True
        fx = Effects()
        fx.send += [(p, Leave(self.node_id)) for p in sorted(self.members)]
        fx.merge(self._send_to_owners(records))
        self.hints.clear()
        if not self.store:
            fx.events.append(("left", self.node_id))
        return fx

    # ---- persistence ----------------------------------------------------------------------
    def persistent_state(self) -> Mapping[str, Any]:
        return {
            "store": dict(self.store),
            "hints": {n: dict(b) for n, b in self.hints.items()},
            "counter": self.counter,
            "members": sorted(self.members),
            "left": self.left,
            "incarnation": self.incarnation,
        }

    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: DhtConfig | Mapping[str, Any] | None,
        state: Mapping[str, Any],
    ) -> DhtNode:
        node = cls(node_id, [m for m in state["members"] if m != node_id], rng, config)
        node.store = dict(state["store"])
        node.hints = {n: dict(b) for n, b in state["hints"].items()}
        node.counter = state["counter"]
        node.left = state["left"]
        node.incarnation = state["incarnation"] + 1
        return node


# ---- the founding API, on the simulator's kernel ----------------------------------------


class QuorumError(RuntimeError):
    """The operation got no quorum of replicas in time."""


CLIENT = "dht-client"


class LocalDht:
    """DHT nodes on the simulator's kernel: seeded latencies, virtual time, nodes that
    crash (messages to them are lost; they keep what they persisted) and recover."""

    def __init__(
        self, config: DhtConfig, seed: int = 0, latency_ms: tuple[float, float] = (1.0, 10.0)
    ) -> None:
        self.config = config
        self.kernel = Kernel(seed, NetworkConfig(latency_ms=latency_ms))
        self._replies: dict[int, ClientReply] = {}
        self._undecided: dict[int, str] = {}
        self._seq = 0
        self.kernel.register_client(CLIENT, self._on_reply)
        self.kernel.watchers.append(self._on_events)

    def _on_reply(self, reply: ClientReply, node_id: NodeId, now: float) -> None:
        self._replies[reply.seq] = reply

    def _on_events(self, node_id: NodeId, events: list[tuple[Any, ...]]) -> None:
        for event in events:
            if event[0] == "indeterminate" and event[1] == CLIENT:
                self._undecided[event[2]] = event[3]

    @property
    def nodes(self) -> dict[NodeId, DhtNode]:
        """The nodes that are up."""
        return self.kernel.nodes  # type: ignore[return-value]

    @property
    def down(self) -> set[NodeId]:
        return set(self.kernel.network.down)

    @property
    def now(self) -> float:
        return self.kernel.now

    @property
    def events(self) -> list[tuple[float, NodeId, tuple[Any, ...]]]:
        return self.kernel.events

    def __getitem__(self, node_id: NodeId) -> DhtHandle:
        if node_id not in self.kernel.spawned:
            raise KeyError(f"no DHT node {node_id!r}")
        return DhtHandle(self, node_id)

    def run_for(self, seconds: float) -> None:
        """Advance virtual time by `seconds`, delivering everything due."""
        self.kernel.run(until=self.kernel.now + seconds)

    def request(self, node_id: NodeId, op: Operation, limit_s: float = 10.0) -> ClientReply:
        """Send `op` to `node_id` and run the kernel until it answers (or `limit_s`). A
        write its coordinator could not settle raises `QuorumError` saying it may still
        take effect."""
        if node_id in self.kernel.network.down:
            raise QuorumError(f"{node_id} is down")
        self._seq += 1
        seq = self._seq
        self.kernel.send_request(CLIENT, node_id, ClientRequest(CLIENT, seq, op))
        end = self.kernel.now + limit_s
        while seq not in self._replies and seq not in self._undecided and self.kernel.now < end:
            self.kernel.run(until=min(end, self.kernel.now + 0.002))
        reply = self._replies.pop(seq, None)
        if reply is None:
            detail = self._undecided.pop(seq, None)
            raise QuorumError(
                detail or f"no answer from {node_id} within {limit_s}s of virtual time"
            )
        return reply

    # ---- membership and failures ----------------------------------------------------------
    def spawn(self, node_id: NodeId, peers: Sequence[NodeId], joining: bool = False) -> None:
        config = {f: getattr(self.config, f) for f in DhtConfig.__dataclass_fields__}
        self.kernel.spawn(DhtNode, node_id, peers, config | {"joining": joining})

    def join(self, node_id: NodeId, settle_s: float = 2.0) -> DhtHandle:
        """A new node joins; the others hand it its keys within `settle_s`."""
        if node_id in self.kernel.spawned:
            raise ValueError(f"DHT node {node_id!r} exists already")
        self.spawn(node_id, [n for n in self.nodes if not self.nodes[n].left], joining=True)
        self.run_for(settle_s)
        return DhtHandle(self, node_id)

    def leave(self, node_id: NodeId, settle_s: float = 2.0) -> None:
        """`node_id` hands its keys over and leaves; its process then stops."""
        reply = self.request(node_id, Operation(DhtOp.LEAVE, ""))  # type: ignore[arg-type]
        if not reply.ok:
            raise QuorumError(reply.error or "leave failed")
        self.run_for(settle_s)
        self.kernel.network.fail_node(node_id, crash_stop=True)

    def stop(self, node_id: NodeId) -> None:
        """The node crashes: messages to it are lost until it recovers."""
        self.kernel.network.fail_node(node_id)

    def start(self, node_id: NodeId) -> None:
        """The node recovers from what it persisted."""
        self.kernel.network.recover_node(node_id)

    def holders(self, key: str) -> set[NodeId]:
        """Up nodes holding a live (not deleted) record of `key` in their own store."""
        return {
            n
            for n, node in self.nodes.items()
            if any(not r.deleted for r in node.store.get(key, ())) and not node.left
        }


@dataclass(frozen=True)
class DhtHandle:
    """One node of a `LocalDht`, with the founding API: put, get, delete."""

    dht: LocalDht
    node_id: NodeId

    def _call(self, op: Operation) -> DhtAnswer:
        reply = self.dht.request(self.node_id, op)
        if not reply.ok:
            raise QuorumError(reply.error or "operation failed")
        return reply.value

    def put(self, key: str, value: Any) -> Any:
        self._call(Operation(OpKind.PUT, key, value))
        return value

    def get(self, key: str) -> Any:
        return self._call(Operation(OpKind.GET, key)).value

    def read(self, key: str) -> DhtAnswer:
        """The value with its clock and how many siblings the read found."""
        return self._call(Operation(OpKind.GET, key))

    def delete(self, key: str) -> None:
        self._call(Operation(DhtOp.DELETE, key))  # type: ignore[arg-type]

    @property
    def node(self) -> DhtNode:
        return self.dht.nodes[self.node_id]


def create_dht(
    nodes: int | Iterable[NodeId],
    replication_factor: int = 2,
    *,
    write_quorum: int | None = None,
    read_quorum: int | None = None,
    seed: int = 0,
    **config: Any,
) -> LocalDht:
    """A DHT of `nodes` (a count, named node-0.., or names) with N = `replication_factor`
    (further `DhtConfig` fields by name: mode="sloppy", ...)."""
    names = [f"node-{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
    if not names:
        raise ValueError("a DHT needs at least one node")
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be distinct, got {names}")
    dht = LocalDht(DhtConfig(replication_factor, write_quorum, read_quorum, **config), seed)
    for n in names:
        dht.spawn(n, [m for m in names if m != n])
    return dht
