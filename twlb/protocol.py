"""The contract between the simulator's kernel and the protocols it drives.

A protocol node is a sans-IO state machine in the manner of etcd-io/raft: it is fed
events (a message from a peer, a timer tick, a client request) together with the
current virtual time, and returns an `Effects` value saying what to send, what to
answer, what to persist and when to be woken next. It reads no clock, opens no
socket, touches no disk and draws randomness only from the `random.Random` it was
given. The kernel does all of that, so the same object runs under the simulator, in
unit tests on a hand-driven network, and (for gossip) behind real UDP sockets.

Lifecycle, as the kernel drives it:
  node = Algorithm(node_id, peers, rng, config)        # peers excludes node_id
  effects = node.start(now)
  effects = node.on_message(src, message, now)          # for each delivered message
  effects = node.on_timer(now)                          # at effects.wake_at (latest asked)
  effects = node.on_request(request, now)               # a client operation
  state  = node.persistent_state()                      # what survives a crash
  node = Algorithm.recover(node_id, peers, rng, config, state)  # crash-recover
  effects = node.start(now)                             # then started like a new node
Messages must be immutable (frozen dataclasses): the kernel may deliver one twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

NodeId = str


class OpKind(StrEnum):
    """Operations of the replicated key-value state machine every protocol serves."""

    GET = "get"
    PUT = "put"
    CAS = "cas"  # compare-and-set: value is (expected, new)


@dataclass(frozen=True, slots=True)
class Operation:
    kind: OpKind
    key: str
    value: Any = None  # PUT: the new value; CAS: (expected, new); GET: None


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One client operation; (client, seq) identifies it for de-duplication."""

    client: str
    seq: int
    op: Operation


@dataclass(frozen=True, slots=True)
class ClientReply:
    """A node's answer to a request. ok=False means the operation certainly did not
    take effect (for CAS: the expected value did not match, so nothing changed);
    a redirect names the node the client should try instead (`leader_hint`)."""

    client: str
    seq: int
    ok: bool
    value: Any = None
    leader_hint: NodeId | None = None
    error: str | None = None


@dataclass(slots=True)
class Effects:
    """What one step of a protocol node asks the kernel to do."""

    send: list[tuple[NodeId, Any]] = field(default_factory=list)
    replies: list[ClientReply] = field(default_factory=list)
    # Absolute virtual time at which to call on_timer next; None keeps the last asked.
    wake_at: float | None = None
    # Protocol-level facts for the checkers and the timeline (for example
    # ("leader", term), ("commit", index, operation), ("view", v)).
    events: list[tuple[Any, ...]] = field(default_factory=list)

    def merge(self, other: Effects) -> Effects:
        self.send.extend(other.send)
        self.replies.extend(other.replies)
        if other.wake_at is not None:
            self.wake_at = (
                other.wake_at if self.wake_at is None else min(self.wake_at, other.wake_at)
            )
        self.events.extend(other.events)
        return self


class ProtocolNode(Protocol):
    node_id: NodeId

    def start(self, now: float) -> Effects: ...
    def on_message(self, src: NodeId, message: Any, now: float) -> Effects: ...
    def on_timer(self, now: float) -> Effects: ...
    def on_request(self, request: ClientRequest, now: float) -> Effects: ...
    def persistent_state(self) -> Mapping[str, Any]: ...


class KVStateMachine:
    """The key-value state machine every consensus protocol replicates.

    Applying the same operations in the same order gives the same answers on every
    replica; duplicates of an already applied (client, seq) return the first answer.
    """

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self._answered: dict[str, tuple[int, ClientReply]] = {}

    def apply(self, request: ClientRequest) -> ClientReply:
        last = self._answered.get(request.client)
        if last is not None and request.seq <= last[0]:
            # A client has one operation outstanding at a time, so an older seq is a
            # stale duplicate (a retry that reached the log twice): never apply it again.
            if last[0] == request.seq:
                return last[1]
            return ClientReply(request.client, request.seq, False, error="stale-duplicate")
        op = request.op
        if op.kind is OpKind.GET:
            reply = ClientReply(request.client, request.seq, True, self.data.get(op.key))
        elif op.kind is OpKind.PUT:
            self.data[op.key] = op.value
            reply = ClientReply(request.client, request.seq, True, op.value)
        else:
            expected, new = op.value
            if self.data.get(op.key) == expected:
                self.data[op.key] = new
                reply = ClientReply(request.client, request.seq, True, new)
            else:
                reply = ClientReply(request.client, request.seq, False, self.data.get(op.key))
        self._answered[request.client] = (request.seq, reply)
        return reply

    def answered(self, request: ClientRequest) -> ClientReply | None:
        """The reply already given to this very request, if it was applied."""
        last = self._answered.get(request.client)
        return last[1] if last is not None and last[0] == request.seq else None

    def snapshot(self) -> dict[str, Any]:
        return {"data": dict(self.data), "answered": dict(self._answered)}

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> KVStateMachine:
        sm = cls()
        sm.data = dict(snap["data"])
        sm._answered = dict(snap["answered"])
        return sm


def leader_timing(
    algorithm: str,
    config: Mapping[str, Any],
    default_timeout: tuple[float, float],
    default_heartbeat: float,
    bugs: frozenset[str] | Sequence[str],
) -> tuple[tuple[float, float], float, str | None]:
    """A leader-based protocol's election timeout range, heartbeat and broken variant
    from its config, checked: the heartbeat must be shorter than the shortest election
    timeout (or followers time out under a live leader), and a bug must be known."""
    low, high = config.get("election_timeout", default_timeout)
    heartbeat = float(config.get("heartbeat", default_heartbeat))
    bug = config.get("bug")
    if not 0 < heartbeat < low <= high:
        raise ValueError(
            f"{algorithm} needs 0 < heartbeat < election timeout low <= high, got "
            f"heartbeat={heartbeat}, election_timeout=({low}, {high})"
        )
    if bug is not None and bug not in bugs:
        raise ValueError(f"unknown {algorithm} bug {bug!r}; known: {sorted(bugs)}")
    return (float(low), float(high)), heartbeat, bug


def quorum(n: int) -> int:
    """Majority of n voters."""
    return n // 2 + 1


def bft_faults(n: int) -> int:
    """f for PBFT: the most Byzantine replicas n = 3f + 1 (or more) tolerates."""
    return (n - 1) // 3


__all__: Sequence[str] = [
    "NodeId",
    "OpKind",
    "Operation",
    "ClientRequest",
    "ClientReply",
    "Effects",
    "ProtocolNode",
    "KVStateMachine",
    "leader_timing",
    "quorum",
    "bft_faults",
]
