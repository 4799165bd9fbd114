"""A replicated distributed hash table in Dynamo's manner, as sans-IO protocol nodes.

Each key lives on the first R distinct nodes clockwise from it on the consistent-hash ring
(`twlb.balancer.hashing.HashRing`, the ring the balancer routes with). Any node
coordinates a client's put, get or delete: it sends the operation to the key's R
replicas and answers once W of them acknowledged a write or Rq of them answered a read
(W + Rq > R: a read meets the latest acknowledged write). Versions are hybrid logical
clock stamps (microseconds or a later stamp seen, coordinator), so the newest write wins
everywhere; a delete is a tombstone.

- A replica that does not answer in time is suspected; the coordinator sends its copy to
  the next node on the ring instead, with a hint naming the replica it stands in for
  (sloppy quorum), or keeps the hint itself when no node is left to stand in. Hinted
  records are kept apart and handed to the replica when it answers again (hinted
  hand-off), so a replica that was down gets every write it missed.
- A read that finds a replica stale or missing the newest version writes it back
  (read repair).
- A joining node announces itself; every node hands it the keys it now holds a replica
  of and drops those it no longer does once the hand-off is acknowledged. A leaving node
  hands each of its keys to the nodes that take over before it goes.

The nodes follow `twlb.protocol`: they read no clock and open no socket, and run on
the simulator's kernel (`twlb.sim.kernel`). The founding simulator's API is
`create_dht(nodes, replication_factor=2)` and a node's `put`, `get` and `delete`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from twlb.balancer.hashing import HashRing
from twlb.sim.kernel import Kernel
from twlb.sim.network import NetworkConfig

from twlb.protocol import ClientReply, ClientRequest, Effects, NodeId, Operation, OpKind


class DhtOp(StrEnum):
    """The table's operations (GET and PUT share their values with `OpKind`)."""

    GET = "get"
    PUT = "put"
    DELETE = "delete"
    LEAVE = "leave"  # administrative: the coordinator itself leaves the ring


Version = tuple[int, str]  # (hybrid logical clock, coordinating node): totally ordered


@dataclass(frozen=True, slots=True)
class Record:
    key: str
    value: Any
    version: Version
    deleted: bool = False


# ---- messages (immutable: the network may deliver one twice) ------------------------------


@dataclass(frozen=True, slots=True)
class Store:
    op_id: str
    record: Record
    hint: NodeId | None = None  # the replica this copy stands in for


@dataclass(frozen=True, slots=True)
class StoreAck:
    op_id: str
    key: str


@dataclass(frozen=True, slots=True)
class Fetch:
    op_id: str
    key: str


@dataclass(frozen=True, slots=True)
class FetchReply:
    op_id: str
    key: str
    record: Record | None


@dataclass(frozen=True, slots=True)
class Handoff:
    """Records the receiver holds a replica of from now on (join, leave, hinted hand-off)."""

    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class HandoffAck:
    versions: tuple[tuple[str, Version], ...]


@dataclass(frozen=True, slots=True)
class Join:
    node: NodeId


@dataclass(frozen=True, slots=True)
class Leave:
    node: NodeId


@dataclass(frozen=True)
class DhtConfig:
    """Replication factor R, write quorum W, read quorum Rq (defaults: majorities of R)."""

    replication_factor: int = 2
    write_quorum: int | None = None
    read_quorum: int | None = None
    vnodes: int = 32
    algorithm: str = "sha256"
    request_timeout: float = 0.5
    hint_interval: float = 0.5
    joining: bool = False  # start() announces the node to its peers

    @property
    def w(self) -> int:
        return self.replication_factor // 2 + 1 if self.write_quorum is None else self.write_quorum

    @property
    def rq(self) -> int:
        return self.replication_factor // 2 + 1 if self.read_quorum is None else self.read_quorum

    def __post_init__(self) -> None:
        r = self.replication_factor
        if r < 1:
            raise ValueError(f"replication_factor must be at least 1, got {r}")
        for name, q in (("write_quorum", self.w), ("read_quorum", self.rq)):
            if not 1 <= q <= r:
                raise ValueError(f"{name} must be in 1..{r} (the replication factor), got {q}")


@dataclass
class _Pending:
    request: ClientRequest
    kind: DhtOp
    key: str
    targets: dict[NodeId, NodeId | None]  # node -> the replica it stands in for (hint)
    deadline: float
    record: Record | None = None  # the write's record
    acks: set[NodeId] = field(default_factory=set)
    answers: dict[NodeId, Record | None] = field(default_factory=dict)
    replied: bool = False
    retried: bool = False


def newer(a: Record | None, b: Record | None) -> Record | None:
    """The newer of two records (None: absent)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a.version >= b.version else b


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
        self.store: dict[str, Record] = {}
        self.hints: dict[NodeId, dict[str, Record]] = {}
        self.suspected: set[NodeId] = set()
        self.lamport = 0
        self.left = False
        self._ops = 0
        self._pending: dict[str, _Pending] = {}
        self._next_hint_round: float | None = None

    # ---- placement ------------------------------------------------------------------------
    def preference(self, key: str) -> list[NodeId]:
        """The key's R replicas: the first R distinct members clockwise from it."""
        return self.ring.successors(key, self.config.replication_factor)

    def _targets(self, key: str) -> dict[NodeId, NodeId | None]:
        """Replicas to contact, each suspected one replaced by the next healthy node on the
        ring with a hint naming it."""
        homes = self.preference(key)
        spare = [
            n
            for n in self.ring.successors(key, len(self.members))
            if n not in homes and n not in self.suspected
        ]
        out: dict[NodeId, NodeId | None] = {}
        for h in homes:
            if h == self.node_id or h not in self.suspected:
                out[h] = None
            elif spare:
                out[spare.pop(0)] = h
        return out

    def lookup(self, key: str) -> Record | None:
        """The newest record this node holds for `key`, its own or hinted."""
        best = self.store.get(key)
        for hinted in self.hints.values():
            best = newer(best, hinted.get(key))
        return best

    def _keep(self, record: Record, hint: NodeId | None = None) -> None:
        self.lamport = max(self.lamport, record.version[0])
        if hint is not None and hint != self.node_id:
            bucket = self.hints.setdefault(hint, {})
            bucket[record.key] = newer(bucket.get(record.key), record)  # type: ignore[assignment]
        else:
            self.store[record.key] = newer(self.store.get(record.key), record)  # type: ignore[assignment]

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, now: float) -> Effects:
        fx = Effects(wake_at=now + self.config.hint_interval)
        self._next_hint_round = now + self.config.hint_interval
        if self.config.joining:
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
        self._ops += 1
        op_id = f"{self.node_id}:{self._ops}"
        deadline = now + self.config.request_timeout
        p = _Pending(request, kind, op.key, self._targets(op.key), deadline)
        self._pending[op_id] = p
        if kind is DhtOp.GET:
            for target in p.targets:
                if target == self.node_id:
                    p.answers[target] = self.lookup(op.key)
                else:
                    fx.send.append((target, Fetch(op_id, op.key)))
        else:
            # A hybrid logical clock: the time in microseconds unless this node has seen a
            # later stamp, so a write that follows an acknowledged one is newer wherever
            # it is coordinated (last writer wins, as Cassandra's timestamps).
            self.lamport = max(self.lamport + 1, int(now * 1_000_000))
            p.record = Record(
                op.key,
                None if kind is DhtOp.DELETE else op.value,
                (self.lamport, self.node_id),
                deleted=kind is DhtOp.DELETE,
            )
            for target, hint in p.targets.items():
                if target == self.node_id:
                    self._keep(p.record, hint)
                    p.acks.add(target)
                else:
                    fx.send.append((target, Store(op_id, p.record, hint)))
            covered = set(p.targets) | set(p.targets.values())
            for home in self.preference(op.key):
                if home not in covered:  # suspected, and no node left to stand in for it
                    self._keep(p.record, home)
        fx.merge(self._progress(op_id, p, now))
        if op_id in self._pending:
            fx.wake_at = min(deadline, self._next_hint_round or deadline)
        return fx

    def _progress(self, op_id: str, p: _Pending, now: float) -> Effects:
        """Answer the client once a quorum is in; finish (read repair) when all are in."""
        fx = Effects()
        cfg = self.config
        if p.kind is DhtOp.GET:
            # A stand-in that holds nothing for the key says little: it counts toward the
            # read quorum only once every target has answered.
            counted = sum(1 for n, r in p.answers.items() if p.targets[n] is None or r)
            done = len(p.answers) == len(p.targets)
            if not p.replied and (counted >= cfg.rq or (done and len(p.answers) >= cfg.rq)):
                fx.replies.append(self._read_answer(p))
            if done:
                fx.merge(self._read_repair(op_id, p))
                del self._pending[op_id]
        else:
            if not p.replied and len(p.acks) >= cfg.w:
                value = p.record.value if p.record else None
                fx.replies.append(ClientReply(p.request.client, p.request.seq, True, value))
                fx.events.append(("write", p.key, p.record.version if p.record else None))
                p.replied = True
            if len(p.acks) == len(p.targets):
                del self._pending[op_id]
        return fx

    @staticmethod
    def _read_answer(p: _Pending) -> ClientReply:
        best = None
        for r in p.answers.values():
            best = newer(best, r)
        p.replied = True
        value = None if best is None or best.deleted else best.value
        return ClientReply(p.request.client, p.request.seq, True, value)

    def _read_repair(self, op_id: str, p: _Pending) -> Effects:
        fx = Effects()
        best = None
        for r in p.answers.values():
            best = newer(best, r)
        if best is None:
            return fx
        for node, r in p.answers.items():
            if r is not None and r.version == best.version:
                continue
            if node == self.node_id:
                self._keep(best, p.targets.get(node))
            else:
                fx.send.append((node, Store(op_id + ":repair", best, p.targets.get(node))))
            fx.events.append(("read-repair", node, p.key))
        return fx

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        fx = Effects()
        self.suspected.discard(src)
        if isinstance(message, Store):
            self._keep(message.record, message.hint)
            fx.send.append((src, StoreAck(message.op_id, message.record.key)))
        elif isinstance(message, StoreAck):
            p = self._pending.get(message.op_id)
            if p is not None and p.kind is not DhtOp.GET and src in p.targets:
                p.acks.add(src)
                fx.merge(self._progress(message.op_id, p, now))
        elif isinstance(message, Fetch):
            fx.send.append((src, FetchReply(message.op_id, message.key, self.lookup(message.key))))
        elif isinstance(message, FetchReply):
            p = self._pending.get(message.op_id)
            if p is not None and p.kind is DhtOp.GET and src in p.targets:
                p.answers[src] = message.record
                self.lamport = max(self.lamport, message.record.version[0] if message.record else 0)
                fx.merge(self._progress(message.op_id, p, now))
        elif isinstance(message, Handoff):
            for r in message.records:
                self._keep(r)
            fx.send.append((src, HandoffAck(tuple((r.key, r.version) for r in message.records))))
            fx.events.append(("handoff-in", src, len(message.records)))
        elif isinstance(message, HandoffAck):
            fx.merge(self._handed_off(src, message.versions))
        elif isinstance(message, Join):
            fx.merge(self._on_join(message.node))
        elif isinstance(message, Leave):
            fx.merge(self._on_leave(message.node))
        return fx

    def on_timer(self, now: float) -> Effects:
        fx = Effects()
        for op_id, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            silent = [t for t in p.targets if t not in p.acks and t not in p.answers]
            for t in silent:
                if t not in self.suspected:
                    self.suspected.add(t)
                    fx.events.append(("suspect", t))
            if not p.retried and silent:
                # Sloppy quorum: the silent replicas' copies go to stand-ins, once.
                p.retried = True
                p.deadline = now + self.config.request_timeout
                fx.merge(self._retarget(op_id, p, silent))
                continue
            if not p.replied and p.kind is DhtOp.GET and len(p.answers) >= self.config.rq:
                fx.replies.append(self._read_answer(p))  # the deadline: stand-ins count too
            if not p.replied:
                need = self.config.rq if p.kind is DhtOp.GET else self.config.w
                got = len(p.answers) if p.kind is DhtOp.GET else len(p.acks)
                fx.replies.append(
                    ClientReply(
                        p.request.client,
                        p.request.seq,
                        False,
                        error=f"quorum not reached: {got} of {need} replicas answered",
                    )
                )
            if p.kind is DhtOp.GET:
                fx.merge(self._read_repair(op_id, p))
            elif p.record is not None:
                # Stand-ins that never answered either: the coordinator keeps the hints.
                for t in silent:
                    self._keep(p.record, p.targets[t] or t)
            del self._pending[op_id]
        if self._next_hint_round is not None and now >= self._next_hint_round:
            self._next_hint_round = now + self.config.hint_interval
            for intended, records in sorted(self.hints.items()):
                if records and intended in self.members:
                    fx.send.append((intended, Handoff(tuple(records.values()))))
            # An empty hand-off is a probe: the answer clears the suspicion.
            for n in sorted(self.suspected & self.members - self.hints.keys()):
                fx.send.append((n, Handoff(())))
        wakes = [p.deadline for p in self._pending.values()]
        if self._next_hint_round is not None:
            wakes.append(self._next_hint_round)
        fx.wake_at = min(wakes) if wakes else None
        return fx

    def _retarget(self, op_id: str, p: _Pending, silent: list[NodeId]) -> Effects:
        fx = Effects()
        used = set(p.targets)
        spare = [
            n
            for n in self.ring.successors(p.key, len(self.members))
            if n not in used and n not in self.suspected
        ]
        for t in silent:
            hint = p.targets.get(t) or t
            if not spare:
                if p.record is not None:  # no stand-in left: the coordinator keeps the hint
                    self._keep(p.record, hint)
                continue
            stand_in = spare.pop(0)
            del p.targets[t]
            p.targets[stand_in] = hint
            if p.kind is DhtOp.GET:
                fx.send.append((stand_in, Fetch(op_id, p.key)))
            else:
                assert p.record is not None
                fx.send.append((stand_in, Store(op_id, p.record, hint)))
                fx.events.append(("hint", stand_in, hint, p.key))
        return fx

    # ---- membership and hand-off ----------------------------------------------------------
    def _handed_off(self, src: NodeId, versions: Iterable[tuple[str, Version]]) -> Effects:
        """`src` holds these versions now: drop the hints for it and the keys no longer ours."""
        fx = Effects()
        bucket = self.hints.get(src, {})
        for key, version in versions:
            if key in bucket and bucket[key].version <= version:
                del bucket[key]
            mine = self.store.get(key)
            ours = self.node_id in self.preference(key) and not self.left
            if mine is not None and not ours and mine.version <= version:
                del self.store[key]
        if src in self.hints and not bucket:
            del self.hints[src]
        if self.left and not self.store and not self.hints:
            fx.events.append(("left", self.node_id))
        return fx

    def _send_to_owners(self, records: Iterable[Record], only_new: NodeId | None = None) -> Effects:
        """Handoff messages giving each record to its current replicas (other than this
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
        return self._send_to_owners(list(self.store.values()), only_new=node)

    def _on_leave(self, node: NodeId) -> Effects:
        if node not in self.members or node == self.node_id:
            return Effects()
        self.members.discard(node)
        self.suspected.discard(node)
        self.ring.remove(node)
        # Hints kept for a node that is gone belong to whoever replicates the key now.
        orphans = list(self.hints.pop(node, {}).values())
        for r in orphans:
            if self.node_id in self.preference(r.key):
                self._keep(r)
        return self._send_to_owners(orphans)

    def leave(self, now: float) -> Effects:
        """Leave the ring: tell every peer, and hand each key to the nodes that take it over."""
        records = list(self.store.values()) + [r for b in self.hints.values() for r in b.values()]
        self.members.discard(self.node_id)
        self.ring.remove(self.node_id)
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
            "lamport": self.lamport,
            "members": sorted(self.members),
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
        node.lamport = state["lamport"]
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
        self._seq = 0
        self.kernel.register_client(CLIENT, self._on_reply)

    def _on_reply(self, reply: ClientReply, node_id: NodeId, now: float) -> None:
        self._replies[reply.seq] = reply

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
        """Send `op` to `node_id` and run the kernel until it answers (or `limit_s`)."""
        if node_id in self.kernel.network.down:
            raise QuorumError(f"{node_id} is down")
        self._seq += 1
        seq = self._seq
        self.kernel.send_request(CLIENT, node_id, ClientRequest(CLIENT, seq, op))
        end = self.kernel.now + limit_s
        while seq not in self._replies and self.kernel.now < end:
            self.kernel.run(until=min(end, self.kernel.now + 0.002))
        reply = self._replies.pop(seq, None)
        if reply is None:
            raise QuorumError(f"no answer from {node_id} within {limit_s}s of virtual time")
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
            if key in node.store and not node.store[key].deleted and not node.left
        }


@dataclass(frozen=True)
class DhtHandle:
    """One node of a `LocalDht`, with the founding API: put, get, delete."""

    dht: LocalDht
    node_id: NodeId

    def _call(self, op: Operation) -> Any:
        reply = self.dht.request(self.node_id, op)
        if not reply.ok:
            raise QuorumError(reply.error or "operation failed")
        return reply.value

    def put(self, key: str, value: Any) -> Any:
        return self._call(Operation(OpKind.PUT, key, value))

    def get(self, key: str) -> Any:
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
    """A DHT of `nodes` (a count, named node-0.., or names) with R = `replication_factor`."""
    names = [f"node-{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
    if not names:
        raise ValueError("a DHT needs at least one node")
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be distinct, got {names}")
    dht = LocalDht(DhtConfig(replication_factor, write_quorum, read_quorum, **config), seed)
    for n in names:
        dht.spawn(n, [m for m in names if m != n])
    return dht
