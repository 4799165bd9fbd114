"""PBFT (Castro and Liskov 1999) as a sans-IO state machine for `twlb.sim`.

n = 3f + 1 replicas (more is allowed; f = (n - 1) // 3) tolerate f Byzantine ones.
Normal case: the primary of view v (replica v mod n in sorted order) assigns a sequence
number to a client request and multicasts PRE-PREPARE; a backup that accepts it
multicasts PREPARE; a replica holding the pre-prepare and 2f matching prepares from
distinct backups is *prepared* and multicasts COMMIT; with 2f+1 matching commits it is
*committed-local* and executes requests in sequence order on its `KVStateMachine`,
replying to the client. The client takes a result once f+1 replicas sent the same one
(`ReplyQuorum`).

Checkpoints every `checkpoint_interval` executions: 2f+1 matching CHECKPOINT messages
make one stable; everything at or below it is garbage-collected and the low water mark
moves (sequence numbers are accepted only within [h+1, h+window]). A replica left behind
a stable checkpoint fetches that state and checks it against the certified digest.

View change: a backup with a client request not executed within `view_timeout`
multicasts VIEW-CHANGE for v+1 carrying its stable checkpoint proof and a prepared
certificate (the pre-prepare and 2f prepares) for every prepared request above it; a
replica joins a view change once f+1 replicas asked for higher views. The new primary,
with 2f+1 view-changes, multicasts NEW-VIEW with them and the pre-prepares it derives:
per sequence number above the latest stable checkpoint, the request of the
highest-view certificate, or a null request for a gap. Every replica recomputes and
checks that set before entering the view. An unsuccessful view change doubles the
timeout (up to 8 times the base) and tries the next view.

Authentication: every message travels in an `Authenticated` envelope carrying an
authenticator, one HMAC-SHA256 per replica under the key of the (sender, receiver) pair
derived from `auth_seed`. A receiver checks its own entry and that the sender is the
link's source; certificates inside view-change and new-view messages carry the original
envelopes, so a replica cannot alter or forge what others said.

Under message loss, replicas resend what they sent for sequence numbers not yet
executed, and a STATUS message (last executed) makes peers resend what a lagging
replica lacks.

Byzantine behaviour per replica (config `byzantine`: the behaviour's name, or a mapping
{node_id: behaviour} so that one config serves every replica):
  "equivocate"    as primary, sends the request's pre-prepare to half the backups and a
                  null request's (with matching prepare and commit) to the other half;
                  as a backup, sends prepares and commits with a wrong digest to half;
  "silent"        sends nothing and answers nobody;
  "wrong-answer"  follows the protocol but replies to clients with wrong results.
Deliberately broken variants (config `bug`):
  "weak-quorums"  prepared with f prepares and committed with f+1 commits, as if faults
                  were crashes, so an equivocating primary splits the correct replicas;
  "commit-2f"     committed with 2f matching commits instead of 2f+1, so a request can
                  execute at one replica without being prepared at f+1 correct ones,
                  and a view change can give its sequence number to another request.

Events for `twlb.sim.invariants`:
  ("start", recovered, last_executed)  ("request", client, seq, operation)
  ("view-change", v)  ("view", v)  ("commit", seq, view, request)
  ("execute", seq, request, (ok, value) | None)  ("checkpoint", seq, digest)
  ("state-transfer", seq)  ("rejected", src, reason)
  ("pre-prepare", seq, view, request)  (the primary assigned a sequence number)
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twlb.protocol import (
    ClientReply,
    ClientRequest,
    Effects,
    KVStateMachine,
    NodeId,
    bft_faults,
)

BYZANTINE_BEHAVIOURS = ("equivocate", "silent", "wrong-answer")
PBFT_BUGS = frozenset({"weak-quorums", "commit-2f"})
# A node's clock may be skewed, and the kernel converts its wake time to global time and
# back in floating point: a timer can fire a hair before the deadline it was set for.
TIMER_SLACK = 1e-9
NULL_DIGEST = "null"


# -- authentication -------------------------------------------------------------------
def encode(body: Any) -> bytes:
    """A canonical byte form of a message body (frozen dataclasses of plain values)."""
    return repr(body).encode()


class Keyring:
    """HMAC keys of one replica with every replica, derived from a shared seed."""

    def __init__(self, seed: str, replicas: Sequence[NodeId]) -> None:
        self.replicas = list(replicas)
        self._keys: dict[tuple[NodeId, NodeId], bytes] = {}
        root = seed.encode()
        for a in replicas:
            for b in replicas:
                pair = "|".join(sorted((a, b))).encode()
                self._keys[(a, b)] = hmac.new(root, pair, hashlib.sha256).digest()

    def mac(self, sender: NodeId, receiver: NodeId, data: bytes) -> bytes:
        return hmac.new(self._keys[(sender, receiver)], data, hashlib.sha256).digest()

    def authenticate(self, sender: NodeId, body: Any) -> Authenticated:
        data = encode(body)
        macs = tuple(self.mac(sender, r, data) for r in self.replicas)
        return Authenticated(sender, body, macs)

    def verify(self, envelope: Authenticated, receiver: NodeId) -> bool:
        if envelope.sender not in self.replicas or len(envelope.macs) != len(self.replicas):
            return False
        index = self.replicas.index(receiver)
        expected = self.mac(envelope.sender, receiver, encode(envelope.body))
        return hmac.compare_digest(envelope.macs[index], expected)


@dataclass(frozen=True, slots=True)
class Authenticated:
    sender: NodeId
    body: Any
    macs: tuple[bytes, ...]


# -- messages (bodies) ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PrePrepare:
    view: int
    seq: int
    digest: str
    request: ClientRequest | None


@dataclass(frozen=True, slots=True)
class Prepare:
    view: int
    seq: int
    digest: str
    replica: NodeId


@dataclass(frozen=True, slots=True)
class Commit:
    view: int
    seq: int
    digest: str
    replica: NodeId


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    digest: str
    replica: NodeId


@dataclass(frozen=True, slots=True)
class PreparedCertificate:
    pre_prepare: Authenticated
    prepares: tuple[Authenticated, ...]


@dataclass(frozen=True, slots=True)
class ViewChange:
    view: int  # the view asked for
    stable_seq: int
    checkpoint_proof: tuple[Authenticated, ...]
    prepared: tuple[PreparedCertificate, ...]
    replica: NodeId


@dataclass(frozen=True, slots=True)
class NewView:
    view: int
    view_changes: tuple[Authenticated, ...]
    pre_prepares: tuple[Authenticated, ...]


@dataclass(frozen=True, slots=True)
class Forward:
    request: ClientRequest


@dataclass(frozen=True, slots=True)
class Status:
    view: int
    last_executed: int


@dataclass(frozen=True, slots=True)
class Relay:
    """A NEW-VIEW passed on to a replica that missed it; it keeps the primary's own
    authenticator, so the relaying replica cannot alter it."""

    envelope: Authenticated


@dataclass(frozen=True, slots=True)
class FetchState:
    seq: int


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    seq: int
    snapshot: Mapping[str, Any]


def request_digest(request: ClientRequest | None) -> str:
    if request is None:
        return NULL_DIGEST
    return hashlib.sha256(encode(request)).hexdigest()[:32]


def state_digest(snapshot: Mapping[str, Any]) -> str:
    data = sorted(snapshot["data"].items(), key=repr)
    answered = sorted(snapshot["answered"].items(), key=repr)
    return hashlib.sha256(encode((data, answered))).hexdigest()[:32]


# -- the client side ------------------------------------------------------------------
class ReplyQuorum:
    """What a PBFT client needs: a result counts once f+1 distinct replicas sent it, so
    at least one correct replica vouches for it. One per operation: `ReplyQuorum(n)`,
    then `add(reply, replica)` for each reply until it returns the accepted one."""

    def __init__(self, n: int) -> None:
        self.needed = bft_faults(n) + 1
        self._votes: dict[tuple[str, int, bool, Any, Any], set[NodeId]] = {}

    def add(self, reply: ClientReply, replica: NodeId) -> ClientReply | None:
        try:
            key = (reply.client, reply.seq, reply.ok, reply.value, reply.error)
            hash(key)
        except TypeError:
            key = (reply.client, reply.seq, reply.ok, repr(reply.value), reply.error)
        voters = self._votes.setdefault(key, set())
        voters.add(replica)
        return reply if len(voters) >= self.needed else None


REPLY_QUORUM = ReplyQuorum  # what a simulated client builds per operation, given n


# -- the replica ----------------------------------------------------------------------
@dataclass(frozen=True)
class PBFTConfig:
    view_timeout: float = 1.0
    checkpoint_interval: int = 16
    window: int = 64  # sequence numbers accepted above the low water mark
    retransmit: float = 0.3
    tick: float = 0.05
    auth_seed: str = "twlb-sim"
    byzantine: str | None = None
    bug: str | None = None

    @classmethod
    def from_mapping(cls, node_id: NodeId, config: Mapping[str, Any]) -> PBFTConfig:
        byzantine = config.get("byzantine")
        if isinstance(byzantine, Mapping):  # one config for every replica
            byzantine = byzantine.get(node_id)
        if byzantine is not None and byzantine not in BYZANTINE_BEHAVIOURS:
            raise ValueError(
                f"pbft: unknown Byzantine behaviour {byzantine!r} for {node_id}; "
                f"known: {sorted(BYZANTINE_BEHAVIOURS)}"
            )
        bug = config.get("bug")
        if bug is not None and bug not in PBFT_BUGS:
            raise ValueError(f"unknown pbft bug {bug!r}; known: {sorted(PBFT_BUGS)}")
        made = cls(
            view_timeout=float(config.get("view_timeout", cls.view_timeout)),
            checkpoint_interval=int(config.get("checkpoint_interval", cls.checkpoint_interval)),
            window=int(config.get("window", cls.window)),
            retransmit=float(config.get("retransmit", cls.retransmit)),
            tick=float(config.get("tick", cls.tick)),
            auth_seed=str(config.get("auth_seed", cls.auth_seed)),
            byzantine=byzantine,
            bug=bug,
        )
        if not (0 < made.tick <= made.retransmit < made.view_timeout):
            raise ValueError("pbft needs 0 < tick <= retransmit < view_timeout")
        if not (made.checkpoint_interval > 0 and made.window >= 2 * made.checkpoint_interval):
            raise ValueError("pbft needs window >= 2 * checkpoint_interval > 0")
        return made


@dataclass
class Slot:
    """What a replica knows of one (view, sequence number)."""

    pre_prepare: Authenticated | None = None
    digest: str | None = None
    request: ClientRequest | None = None
    prepares: dict[NodeId, Authenticated] = field(default_factory=dict)
    commits: dict[NodeId, Authenticated] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False
    since: float = 0.0


class PBFT:
    """One PBFT replica; see the module docstring."""

    def __init__(
        self,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: Mapping[str, Any],
    ) -> None:
        self.node_id = node_id
        self.peers = list(peers)
        self.replicas = sorted([node_id, *peers])
        self.rng = rng
        self.config = PBFTConfig.from_mapping(node_id, config)
        self.n = len(self.replicas)
        self.f = bft_faults(self.n)
        weak = self.config.bug == "weak-quorums"
        self.prepare_quorum = self.f if weak else 2 * self.f
        self.commit_quorum = self.f + 1 if weak else 2 * self.f + 1
        if self.config.bug == "commit-2f":
            self.commit_quorum = 2 * self.f
        self.keys = Keyring(self.config.auth_seed, self.replicas)
        self.recovered = False
        self.view = 0
        self.in_view_change = False
        self.vc_attempts = 0
        self.vc_deadline = 0.0
        self.slots: dict[tuple[int, int], Slot] = {}
        self.certificates: dict[int, PreparedCertificate] = {}  # seq -> highest-view one
        self.committed: dict[int, ClientRequest | None] = {}
        self.last_executed = 0
        self.sm = KVStateMachine()
        self.stable_seq = 0
        self.stable_digest = state_digest(self.sm.snapshot())
        self.stable_proof: tuple[Authenticated, ...] = ()
        self.snapshots: dict[int, dict[str, Any]] = {}  # own checkpoints, by seq
        self.checkpoint_votes: dict[int, dict[NodeId, Authenticated]] = {}
        self.view_changes: dict[int, dict[NodeId, Authenticated]] = {}
        self.new_views: dict[int, Authenticated] = {}
        self.next_seq = 1
        self.assigned: set[tuple[str, int]] = set()
        self.backlog: list[ClientRequest] = []
        self.pending: dict[str, tuple[ClientRequest, float]] = {}  # client -> request, since
        self.next_retransmit = 0.0
        self.rejected = 0
        self.now = 0.0  # the time of the event being handled

    # -- contract -----------------------------------------------------------------
    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: Mapping[str, Any],
        state: Mapping[str, Any],
    ) -> PBFT:
        node = cls(node_id, peers, rng, config)
        for name in (
            "view",
            "slots",
            "certificates",
            "committed",
            "last_executed",
            "stable_seq",
            "stable_digest",
            "stable_proof",
            "snapshots",
            "next_seq",
            "assigned",
            "in_view_change",
        ):
            setattr(node, name, state[name])
        node.sm = KVStateMachine.from_snapshot(state["sm"])
        node.recovered = True
        return node

    def persistent_state(self) -> Mapping[str, Any]:
        return {
            "view": self.view,
            "slots": self.slots,
            "certificates": self.certificates,
            "committed": self.committed,
            "last_executed": self.last_executed,
            "stable_seq": self.stable_seq,
            "stable_digest": self.stable_digest,
            "stable_proof": self.stable_proof,
            "snapshots": self.snapshots,
            "next_seq": self.next_seq,
            "assigned": self.assigned,
            # A replica that crashed while changing view must not come back taking
            # pre-prepares of that view without its NEW-VIEW.
            "in_view_change": self.in_view_change,
            "sm": self.sm.snapshot(),
        }

    def start(self, now: float) -> Effects:
        self.next_retransmit = now + self.config.retransmit
        eff = Effects(
            events=[("start", self.recovered, self.last_executed)], wake_at=now + self.config.tick
        )
        if self.in_view_change:  # it crashed mid view change: ask again for that view
            self.vc_deadline = float("inf")
            self._announce_view_change(eff)
        return self._out(eff)

    def leadership(self) -> int | None:
        """The view this replica leads as its primary, if it is in that view."""
        return self.view if self.primary() == self.node_id and not self.in_view_change else None

    def primary(self, view: int | None = None) -> NodeId:
        return self.replicas[(self.view if view is None else view) % self.n]

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        self.now = now
        eff = Effects(events=[("request", request.client, request.seq, request.op)])
        self._take_request(request, now, eff, from_client=True)
        return self._out(eff)

    def on_timer(self, now: float) -> Effects:
        self.now = now
        eff = Effects()
        if self.in_view_change:
            if now + TIMER_SLACK >= self.vc_deadline:
                self._start_view_change(self.view + 1, now, eff)
        elif any(now - since > self.config.view_timeout for _, since in self.pending.values()):
            self._start_view_change(self.view + 1, now, eff)
        if now + TIMER_SLACK >= self.next_retransmit:
            self._retransmit(now, eff)
            self.next_retransmit = now + self.config.retransmit
        eff.wake_at = now + self.config.tick
        return self._out(eff)

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        self.now = now
        eff = Effects()
        if not isinstance(message, Authenticated) or message.sender != src:
            return self._reject(src, "unauthenticated or sender is not the link's source", eff)
        if not self.keys.verify(message, self.node_id):
            return self._reject(src, "bad authenticator", eff)
        body = message.body
        if isinstance(body, PrePrepare):
            self._on_pre_prepare(message, now, eff)
        elif isinstance(body, Prepare | Commit):
            self._on_vote(message, now, eff)
        elif isinstance(body, Checkpoint):
            self._on_checkpoint(message, eff)
        elif isinstance(body, ViewChange):
            self._on_view_change(message, now, eff)
        elif isinstance(body, NewView):
            self._on_new_view(message, now, eff)
        elif isinstance(body, Forward):
            self._take_request(body.request, now, eff, from_client=False)
        elif isinstance(body, Relay):
            inner = body.envelope
            if not isinstance(inner.body, NewView) or not self.keys.verify(inner, self.node_id):
                return self._reject(src, "relayed new-view with a bad authenticator", eff)
            self._on_new_view(inner, now, eff)
        elif isinstance(body, Status):
            self._on_status(src, body, eff)
        elif isinstance(body, FetchState):
            if body.seq in self.snapshots:
                self._send(src, StateSnapshot(body.seq, self.snapshots[body.seq]), eff)
        elif isinstance(body, StateSnapshot):
            self._on_state(body, eff)
        return self._out(eff)

    # -- sending, and the Byzantine twists ----------------------------------------
    def _send(self, dst: NodeId, body: Any, eff: Effects) -> None:
        eff.send.append((dst, self.keys.authenticate(self.node_id, body)))

    def _broadcast(self, body: Any, eff: Effects) -> Authenticated:
        envelope = self.keys.authenticate(self.node_id, body)
        if self.config.byzantine == "equivocate" and isinstance(body, Prepare | Commit):
            for peer in self.peers:
                if self._second_half(peer):
                    lie = type(body)(body.view, body.seq, "x" + body.digest, body.replica)
                    self._send(peer, lie, eff)
                else:
                    eff.send.append((peer, envelope))
            return envelope
        eff.send.extend((peer, envelope) for peer in self.peers)
        return envelope

    def _second_half(self, peer: NodeId) -> bool:
        others = [r for r in self.replicas if r != self.node_id]
        return others.index(peer) >= len(others) // 2

    def _out(self, eff: Effects) -> Effects:
        behaviour = self.config.byzantine
        if behaviour == "silent":
            eff.send.clear()
            eff.replies.clear()
        elif behaviour == "wrong-answer":
            eff.replies = [
                ClientReply(r.client, r.seq, r.ok, ("wrong", r.value), r.leader_hint, r.error)
                for r in eff.replies
            ]
        return eff

    def _reject(self, src: NodeId, reason: str, eff: Effects) -> Effects:
        self.rejected += 1
        eff.events.append(("rejected", src, reason))
        return eff

    # -- requests -----------------------------------------------------------------
    def _take_request(
        self, request: ClientRequest, now: float, eff: Effects, *, from_client: bool
    ) -> None:
        done = self.sm.answered(request)
        if done is not None:
            eff.replies.append(done)  # a retry of an executed request: answer again
            return
        last = self.pending.get(request.client)
        if last is None or last[0].seq < request.seq:
            self.pending[request.client] = (request, now)
        if self.in_view_change:
            return
        if self.primary() == self.node_id:
            self._assign(request, now, eff)
        elif from_client:
            self._send(self.primary(), Forward(request), eff)

    def _assign(self, request: ClientRequest, now: float, eff: Effects) -> None:
        key = (request.client, request.seq)
        if key in self.assigned:
            return
        if self.next_seq > self.stable_seq + self.config.window:
            if request not in self.backlog:
                self.backlog.append(request)  # wait for the low water mark to move
            return
        self.assigned.add(key)
        seq = self.next_seq
        self.next_seq += 1
        eff.events.append(("pre-prepare", seq, self.view, request))
        if self.config.byzantine == "equivocate":
            self._equivocate(seq, request, now, eff)
            return
        body = PrePrepare(self.view, seq, request_digest(request), request)
        envelope = self._broadcast(body, eff)
        self._accept_pre_prepare(envelope, now, eff)

    def _equivocate(self, seq: int, request: ClientRequest, now: float, eff: Effects) -> None:
        real = PrePrepare(self.view, seq, request_digest(request), request)
        fake = PrePrepare(self.view, seq, NULL_DIGEST, None)
        for peer in self.peers:
            body = fake if self._second_half(peer) else real
            self._send(peer, body, eff)
            # Back the lie with a prepare and a commit for the same digest.
            self._send(peer, Prepare(self.view, seq, body.digest, self.node_id), eff)
            self._send(peer, Commit(self.view, seq, body.digest, self.node_id), eff)
        self._accept_pre_prepare(self.keys.authenticate(self.node_id, real), now, eff)

    # -- normal case ----------------------------------------------------------------
    def _in_window(self, seq: int) -> bool:
        return self.stable_seq < seq <= self.stable_seq + self.config.window

    def _on_pre_prepare(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body: PrePrepare = envelope.body
        if (
            self.in_view_change
            or body.view != self.view
            or envelope.sender != self.primary()
            or not self._in_window(body.seq)
            or body.digest != request_digest(body.request)
        ):
            return
        self._accept_pre_prepare(envelope, now, eff)

    def _accept_pre_prepare(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body: PrePrepare = envelope.body
        slot = self.slots.setdefault((body.view, body.seq), Slot(since=now))
        if slot.pre_prepare is not None:
            return  # the first pre-prepare for (view, seq) stands; another is ignored
        slot.pre_prepare, slot.digest, slot.request = envelope, body.digest, body.request
        if body.request is not None:
            self.assigned.add((body.request.client, body.request.seq))
        if envelope.sender != self.node_id:
            prepare = Prepare(body.view, body.seq, body.digest, self.node_id)
            slot.prepares[self.node_id] = self._broadcast(prepare, eff)
        self._progress(body.view, body.seq, slot, eff)

    def _on_vote(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body = envelope.body
        if body.replica != envelope.sender or body.view != self.view or self.in_view_change:
            return
        if not self._in_window(body.seq):
            return
        slot = self.slots.setdefault((body.view, body.seq), Slot(since=now))
        votes = slot.prepares if isinstance(body, Prepare) else slot.commits
        votes.setdefault(envelope.sender, envelope)
        self._progress(body.view, body.seq, slot, eff)

    def _matching(self, votes: Mapping[NodeId, Authenticated], digest: str) -> list:
        return [e for e in votes.values() if e.body.digest == digest]

    def _progress(self, view: int, seq: int, slot: Slot, eff: Effects) -> None:
        if slot.pre_prepare is None:
            return
        if not slot.prepared:
            primary = self.primary(view)
            prepares = [
                e for e in self._matching(slot.prepares, slot.digest) if e.sender != primary
            ]
            if len(prepares) < self.prepare_quorum:
                return
            slot.prepared = True
            held = self.certificates.get(seq)
            if held is None or held.pre_prepare.body.view <= view:
                certificate = PreparedCertificate(
                    slot.pre_prepare, tuple(prepares[: self.prepare_quorum])
                )
                self.certificates[seq] = certificate
            commit = Commit(view, seq, slot.digest, self.node_id)
            slot.commits[self.node_id] = self._broadcast(commit, eff)
        if not slot.committed and len(self._matching(slot.commits, slot.digest)) >= (
            self.commit_quorum
        ):
            slot.committed = True
            self.committed.setdefault(seq, slot.request)
            eff.events.append(("commit", seq, view, slot.request))
            self._execute(eff)

    def _execute(self, eff: Effects) -> None:
        while self.last_executed + 1 in self.committed:
            seq = self.last_executed + 1
            request = self.committed[seq]
            self.last_executed = seq
            answer = None
            if request is not None:
                reply = self.sm.apply(request)
                answer = (reply.ok, reply.value)
                eff.replies.append(reply)
                pending = self.pending.get(request.client)
                if pending is not None and pending[0].seq <= request.seq:
                    del self.pending[request.client]
            eff.events.append(("execute", seq, request, answer))
            if seq % self.config.checkpoint_interval == 0:
                snapshot = self.sm.snapshot()
                self.snapshots[seq] = snapshot
                checkpoint = Checkpoint(seq, state_digest(snapshot), self.node_id)
                envelope = self._broadcast(checkpoint, eff)
                self._on_checkpoint(envelope, eff)

    # -- checkpoints and state transfer -------------------------------------------
    def _on_checkpoint(self, envelope: Authenticated, eff: Effects) -> None:
        body: Checkpoint = envelope.body
        if body.replica != envelope.sender or body.seq <= self.stable_seq:
            return
        votes = self.checkpoint_votes.setdefault(body.seq, {})
        votes[envelope.sender] = envelope
        matching = tuple(e for e in votes.values() if e.body.digest == body.digest)
        if len(matching) >= 2 * self.f + 1:
            self._make_stable(body.seq, body.digest, matching[: 2 * self.f + 1], eff)

    def _make_stable(
        self, seq: int, digest: str, proof: tuple[Authenticated, ...], eff: Effects
    ) -> None:
        if seq <= self.stable_seq:
            return
        self.stable_seq, self.stable_digest, self.stable_proof = seq, digest, proof
        eff.events.append(("checkpoint", seq, digest))
        for key in [k for k in self.slots if k[1] <= seq]:
            del self.slots[key]
        for table in (self.certificates, self.committed):
            for old in [s for s in table if s <= seq]:
                del table[old]
        for table in (self.snapshots, self.checkpoint_votes):
            for old in [s for s in table if s < seq]:
                del table[old]
        backlog, self.backlog = self.backlog, []
        for request in backlog:
            if self.primary() == self.node_id and not self.in_view_change:
                self._assign(request, self.now, eff)
        if self.last_executed < seq:
            self._fetch_state(eff)

    def _fetch_state(self, eff: Effects) -> None:
        holders = [e.sender for e in self.stable_proof if e.sender != self.node_id]
        for holder in holders:
            self._send(holder, FetchState(self.stable_seq), eff)

    def _on_state(self, body: StateSnapshot, eff: Effects) -> None:
        if body.seq != self.stable_seq or self.last_executed >= body.seq:
            return
        if state_digest(body.snapshot) != self.stable_digest:
            self._reject("?", "state snapshot does not match the stable checkpoint", eff)
            return
        self.sm = KVStateMachine.from_snapshot(body.snapshot)
        self.snapshots[body.seq] = self.sm.snapshot()
        self.last_executed = body.seq
        for client, (request, _) in list(self.pending.items()):
            if self.sm.answered(request) is not None:
                del self.pending[client]
        eff.events.append(("state-transfer", body.seq))
        self._execute(eff)

    # -- retransmission -------------------------------------------------------------
    def _retransmit(self, now: float, eff: Effects) -> None:
        if self.in_view_change:
            own = self.view_changes.get(self.view, {}).get(self.node_id)
            if own is not None:
                eff.send.extend((p, own) for p in self.peers)
            return
        self._broadcast(Status(self.view, self.last_executed), eff)
        for (view, seq), slot in sorted(self.slots.items()):
            if (
                view == self.view
                and seq > self.last_executed
                and now - slot.since >= (self.config.retransmit)
            ):
                self._resend_slot(slot, self.peers, eff)
        own = self.checkpoint_votes.get(max(self.checkpoint_votes, default=-1), {})
        if self.node_id in own:
            eff.send.extend((p, own[self.node_id]) for p in self.peers)
        if self.last_executed < self.stable_seq:
            self._fetch_state(eff)

    def _resend_slot(self, slot: Slot, to: Sequence[NodeId], eff: Effects) -> None:
        for envelope in (
            slot.pre_prepare
            if slot.pre_prepare and slot.pre_prepare.sender == self.node_id
            else None,
            slot.prepares.get(self.node_id),
            slot.commits.get(self.node_id),
        ):
            if envelope is not None:
                eff.send.extend((p, envelope) for p in to)

    def _relay_new_view(self, peer: NodeId, eff: Effects) -> None:
        new_view = self.new_views.get(self.view)
        if new_view is not None and not self.in_view_change:
            self._send(peer, Relay(new_view), eff)

    def _on_status(self, src: NodeId, body: Status, eff: Effects) -> None:
        if body.view < self.view:
            self._relay_new_view(src, eff)
            return
        if body.view != self.view or body.last_executed >= self.last_executed:
            return
        upto = min(self.last_executed, body.last_executed + self.config.checkpoint_interval)
        for seq in range(body.last_executed + 1, upto + 1):
            slot = self.slots.get((self.view, seq))
            if slot is not None:
                self._resend_slot(slot, [src], eff)

    # -- view change ----------------------------------------------------------------
    def _start_view_change(self, view: int, now: float, eff: Effects) -> None:
        if view < self.view or (view == self.view and self.in_view_change):
            return
        self.vc_attempts = self.vc_attempts + 1 if self.in_view_change else 0
        self.view = view
        self.in_view_change = True
        self.vc_deadline = float("inf")  # armed once 2f+1 replicas want this view
        eff.events.append(("view-change", view))
        self._announce_view_change(eff)
        self._arm_view_change_timer(now)
        self._maybe_new_view(view, now, eff)

    def _announce_view_change(self, eff: Effects) -> None:
        certificates = tuple(c for s, c in sorted(self.certificates.items()) if s > self.stable_seq)
        body = ViewChange(self.view, self.stable_seq, self.stable_proof, certificates, self.node_id)
        envelope = self._broadcast(body, eff)
        self.view_changes.setdefault(self.view, {})[self.node_id] = envelope

    def _arm_view_change_timer(self, now: float) -> None:
        # PBFT's liveness rule: wait for the new view only once 2f+1 replicas asked for
        # it, so a replica cut off alone does not climb views nobody else will join.
        asked = self.view_changes.get(self.view, {})
        if self.vc_deadline == float("inf") and len(asked) >= 2 * self.f + 1:
            self.vc_deadline = now + self.config.view_timeout * min(8, 2**self.vc_attempts)

    def _valid_certificate(self, certificate: PreparedCertificate, stable_seq: int) -> bool:
        pp = certificate.pre_prepare
        body = pp.body
        if (
            not isinstance(body, PrePrepare)
            or body.seq <= stable_seq
            or pp.sender != self.primary(body.view)
            or body.digest != request_digest(body.request)
            or not self.keys.verify(pp, self.node_id)
        ):
            return False
        senders = set()
        for prepare in certificate.prepares:
            p = prepare.body
            if (
                not isinstance(p, Prepare)
                or (p.view, p.seq, p.digest) != (body.view, body.seq, body.digest)
                or prepare.sender != p.replica
                or prepare.sender == pp.sender
                or not self.keys.verify(prepare, self.node_id)
            ):
                return False
            senders.add(prepare.sender)
        return len(senders) >= self.prepare_quorum

    def _valid_view_change(self, envelope: Authenticated, view: int) -> bool:
        body = envelope.body
        if not isinstance(body, ViewChange) or body.view != view or body.replica != envelope.sender:
            return False
        if not self.keys.verify(envelope, self.node_id):
            return False
        if body.stable_seq > 0:
            proof = body.checkpoint_proof
            senders = {e.sender for e in proof}
            if len(senders) < 2 * self.f + 1 or not all(
                isinstance(e.body, Checkpoint)
                and e.body.seq == body.stable_seq
                and e.body.digest == proof[0].body.digest
                and e.body.replica == e.sender
                and self.keys.verify(e, self.node_id)
                for e in proof
            ):
                return False
        return all(self._valid_certificate(c, body.stable_seq) for c in body.prepared)

    def _on_view_change(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body: ViewChange = envelope.body
        if body.view < self.view or (body.view == self.view and not self.in_view_change):
            self._relay_new_view(envelope.sender, eff)  # it missed the view we are in
            return
        if not self._valid_view_change(envelope, body.view):
            return
        self.view_changes.setdefault(body.view, {})[envelope.sender] = envelope
        if body.view == self.view:
            self._arm_view_change_timer(now)
        # Join once f+1 replicas want a view above ours: one of them is correct.
        wanting: dict[NodeId, int] = {}
        for v, msgs in self.view_changes.items():
            if v > self.view:
                for sender in msgs:
                    wanting[sender] = min(v, wanting.get(sender, v))
        if len(wanting) >= self.f + 1:
            self._start_view_change(min(wanting.values()), now, eff)
        self._maybe_new_view(body.view, now, eff)

    def _new_view_pre_prepares(
        self, view_changes: Sequence[Authenticated]
    ) -> tuple[int, list[PrePrepare], Authenticated | None]:
        """The pre-prepares a new view must start with, derived from 2f+1 view-changes;
        also the low water mark they imply and the checkpoint proof behind it."""
        best_vc = max(view_changes, key=lambda e: e.body.stable_seq)
        min_s = best_vc.body.stable_seq
        chosen: dict[int, PrePrepare] = {}
        for vc in view_changes:
            for certificate in vc.body.prepared:
                pp = certificate.pre_prepare.body
                if pp.seq > min_s and (pp.seq not in chosen or pp.view > chosen[pp.seq].view):
                    chosen[pp.seq] = pp
        max_s = max(chosen, default=min_s)
        view = view_changes[0].body.view
        pre_prepares = [
            PrePrepare(view, s, chosen[s].digest, chosen[s].request)
            if s in chosen
            else PrePrepare(view, s, NULL_DIGEST, None)
            for s in range(min_s + 1, max_s + 1)
        ]
        return min_s, pre_prepares, best_vc

    def _maybe_new_view(self, view: int, now: float, eff: Effects) -> None:
        if self.primary(view) != self.node_id or view in self.new_views or view != self.view:
            return
        msgs = self.view_changes.get(view, {})
        if len(msgs) < 2 * self.f + 1 or self.node_id not in msgs:
            return
        others = sorted(
            (e for e in msgs.values() if e.sender != self.node_id), key=lambda e: e.sender
        )
        chosen = (msgs[self.node_id], *others[: 2 * self.f])
        _, pre_prepares, _ = self._new_view_pre_prepares(chosen)
        signed = tuple(self.keys.authenticate(self.node_id, pp) for pp in pre_prepares)
        envelope = self._broadcast(NewView(view, chosen, signed), eff)
        self.new_views[view] = envelope
        self._enter_view(envelope, now, eff)

    def _on_new_view(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body: NewView = envelope.body
        if body.view < self.view or (body.view == self.view and not self.in_view_change):
            return
        if envelope.sender != self.primary(body.view):
            return
        senders = {vc.sender for vc in body.view_changes}
        if len(senders) < 2 * self.f + 1 or not all(
            self._valid_view_change(vc, body.view) for vc in body.view_changes
        ):
            return self._reject(envelope.sender, "new-view without 2f+1 valid view-changes", eff)
        _, expected, _ = self._new_view_pre_prepares(body.view_changes)
        got = [pp.body for pp in body.pre_prepares]
        if got != expected or not all(
            pp.sender == envelope.sender and self.keys.verify(pp, self.node_id)
            for pp in body.pre_prepares
        ):
            return self._reject(envelope.sender, "new-view pre-prepares do not follow", eff)
        self._enter_view(envelope, now, eff)

    def _enter_view(self, envelope: Authenticated, now: float, eff: Effects) -> None:
        body: NewView = envelope.body
        min_s, _, best_vc = self._new_view_pre_prepares(body.view_changes)
        if min_s > self.stable_seq:
            vc = best_vc.body
            self._make_stable(
                vc.stable_seq, vc.checkpoint_proof[0].body.digest, vc.checkpoint_proof, eff
            )
        self.view = body.view
        self.in_view_change = False
        self.vc_attempts = 0
        self.new_views[body.view] = envelope
        eff.events.append(("view", body.view))
        for key in [k for k in self.slots if k[0] < body.view]:
            del self.slots[key]
        for v in [v for v in self.view_changes if v <= body.view]:
            del self.view_changes[v]
        self.assigned = set()
        top = min_s
        for pp in body.pre_prepares:
            top = max(top, pp.body.seq)
            if self._in_window(pp.body.seq):
                self._accept_pre_prepare(pp, now, eff)
        self.next_seq = max(top, self.stable_seq) + 1
        # Give the new primary a full timeout for what clients are waiting on.
        for client, (request, _) in list(self.pending.items()):
            self.pending[client] = (request, now)
            if self.primary() == self.node_id:
                self._assign(request, now, eff)
            else:
                self._send(self.primary(), Forward(request), eff)


__all__ = [
    "PBFT",
    "PBFTConfig",
    "ReplyQuorum",
    "REPLY_QUORUM",
    "Keyring",
    "Authenticated",
    "PrePrepare",
    "Prepare",
    "Commit",
    "Checkpoint",
    "PreparedCertificate",
    "ViewChange",
    "NewView",
    "Forward",
    "Status",
    "Relay",
    "FetchState",
    "StateSnapshot",
    "request_digest",
    "state_digest",
    "BYZANTINE_BEHAVIOURS",
    "PBFT_BUGS",
]
