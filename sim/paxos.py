"""Multi-Paxos with a stable leader, as a sans-IO state machine for `twlb.sim`.

Every node is proposer, acceptor and learner. A node that hears no leader for a
randomized election timeout runs phase 1 once for its new ballot (prepare/promise,
covering every slot from its first unlearned one); with a majority of promises it
re-proposes, slot by slot, the value of the highest ballot any promise reported and
fills each gap with a no-op, then serves clients with phase 2 only (accept/accepted
per slot). A value accepted by a majority is chosen; the leader tells every node
(commit) and nodes apply slots in order to their `KVStateMachine`. Heartbeats carry the
leader's learned prefix; a lagging node answers with its own and is sent what it lacks.
A higher ballot in any nack makes a leader stand down. The acceptor's promise and
accepted values, and the highest round seen, are the persistent state.

Events for `twlb.sim.invariants`:
  ("start", recovered)  ("request", client, seq, operation)  ("leader", ballot)
  ("accepted", slot, ballot, value)  ("commit", slot, value)  ("apply", slot, value)
A value is a `ClientRequest` or None (a no-op); a ballot is (round, node_id).
Also ("promise", ballot) when the acceptor promises another proposer (its vote: the
nemesis crashes a node in the instant after it), and ("stand-down", ballot) when a
leader or candidate gives up its ballot (the timeline ends its bar there).

Deliberately broken variant (config `bug="no-phase1"`): a new leader skips phase 1 and
proposes at the slots it believes free, so it can overwrite a value already chosen.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twlb.protocol import (
    ClientReply,
    ClientRequest,
    Effects,
    KVStateMachine,
    NodeId,
    leader_timing,
    quorum,
)

PAXOS_BUGS = frozenset({"no-phase1"})
# A node's clock may be skewed, and the kernel converts its wake time to global time and
# back in floating point: a timer can fire a hair before the deadline it was set for.
TIMER_SLACK = 1e-9
Ballot = tuple[int, NodeId]
NO_BALLOT: Ballot = (0, "")


@dataclass(frozen=True, slots=True)
class Prepare:
    ballot: Ballot
    from_slot: int


@dataclass(frozen=True, slots=True)
class Promise:
    ballot: Ballot
    accepted: tuple[tuple[int, Ballot, Any], ...]  # (slot, ballot, value) from from_slot on


@dataclass(frozen=True, slots=True)
class Accept:
    ballot: Ballot
    slot: int
    value: Any


@dataclass(frozen=True, slots=True)
class Accepted:
    ballot: Ballot
    slot: int


@dataclass(frozen=True, slots=True)
class Nack:
    promised: Ballot


@dataclass(frozen=True, slots=True)
class Commit:
    chosen: tuple[tuple[int, Any], ...]  # (slot, value)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ballot: Ballot
    learned: int  # the leader's learned prefix: slots 1..learned


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    ballot: Ballot
    learned: int


@dataclass(frozen=True)
class PaxosConfig:
    # Several round trips of the CLI's default 10-100 ms latency, so phase 1 finishes
    # before another node's timer fires.
    election_timeout: tuple[float, float] = (0.3, 0.6)
    heartbeat: float = 0.05
    max_batch: int = 64
    bug: str | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> PaxosConfig:
        timeout, heartbeat, bug = leader_timing(
            "paxos", config, cls.election_timeout, cls.heartbeat, PAXOS_BUGS
        )
        return cls(timeout, heartbeat, int(config.get("max_batch", 64)), bug)


class MultiPaxos:
    """One Multi-Paxos node; see the module docstring."""

    def __init__(
        self,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: Mapping[str, Any],
    ) -> None:
        self.node_id = node_id
        self.peers = list(peers)
        self.rng = rng
        self.config = PaxosConfig.from_mapping(config)
        self.quorum = quorum(len(self.peers) + 1)
        # Acceptor (persistent).
        self.promised: Ballot = NO_BALLOT
        self.accepted: dict[int, tuple[Ballot, Any]] = {}
        self.max_round = 0
        self.recovered = False
        # Learner.
        self.chosen: dict[int, Any] = {}  # chosen, not yet applied (a gap precedes them)
        self.log: list[Any] = []  # applied values: slot i is log[i - 1]
        self.sm = KVStateMachine()
        # Proposer.
        self.ballot: Ballot = NO_BALLOT
        self.leading = False
        self.preparing = False
        self.leader: NodeId | None = None
        self.promises: dict[NodeId, Promise] = {}
        self.next_slot = 1
        self.proposals: dict[int, Any] = {}  # slot -> value proposed in self.ballot
        self.acks: dict[int, set[NodeId]] = {}
        self.waiting: dict[int, ClientRequest] = {}
        self.queued: list[ClientRequest] = []
        self.heard: dict[NodeId, float] = {}
        self.led_since = 0.0
        self.deadline = 0.0

    # -- contract -----------------------------------------------------------------
    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: Mapping[str, Any],
        state: Mapping[str, Any],
    ) -> MultiPaxos:
        node = cls(node_id, peers, rng, config)
        node.promised = tuple(state["promised"])
        node.accepted = dict(state["accepted"])
        node.max_round = state["max_round"]
        node.recovered = True
        return node

    def persistent_state(self) -> Mapping[str, Any]:
        return {
            "promised": self.promised,
            "accepted": dict(self.accepted),
            "max_round": self.max_round,
        }

    def leadership(self) -> Ballot | None:
        """The ballot this node leads with, if it believes it leads."""
        return self.ballot if self.leading else None

    def start(self, now: float) -> Effects:
        self._reset_deadline(now)
        return Effects(events=[("start", self.recovered)], wake_at=self.deadline)

    def on_timer(self, now: float) -> Effects:
        eff = Effects()
        if self.leading:
            if self._majority_heard(now):
                self._heartbeat(eff)
                self.deadline = now + self.config.heartbeat
            else:  # cut off from a majority: stand down so clients look elsewhere
                self._stand_down(eff)
                self._reset_deadline(now)
        elif now + TIMER_SLACK >= self.deadline:
            self._campaign(now, eff)
        eff.wake_at = self.deadline
        return eff

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        eff = Effects(events=[("request", request.client, request.seq, request.op)])
        if self.leading:
            if request not in self.waiting.values():
                self._propose(request, eff)
                self.waiting[self.next_slot - 1] = request
        elif self.preparing:
            if request not in self.queued:
                self.queued.append(request)
        else:
            eff.replies.append(
                ClientReply(
                    request.client, request.seq, False, leader_hint=self.leader, error="not-leader"
                )
            )
        return eff

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        eff = Effects()
        if isinstance(message, Prepare):
            self._on_prepare(src, message, eff, now)
        elif isinstance(message, Accept):
            self._on_accept(src, message, now, eff)
        elif isinstance(message, Promise):
            self._on_promise(src, message, now, eff)
        elif isinstance(message, Accepted):
            self._on_accepted(src, message, now, eff)
        elif isinstance(message, Nack):
            self._see_round(message.promised[0])
            if message.promised > self.ballot and (self.leading or self.preparing):
                self._stand_down(eff)
                self.leader = message.promised[1]
                self._reset_deadline(now)
                eff.wake_at = self.deadline
        elif isinstance(message, Commit):
            self._learn(message.chosen, eff)
        elif isinstance(message, Heartbeat):
            if message.ballot >= self.promised:
                self.promised = message.ballot
                self._follow(message.ballot, now, eff)
                eff.send.append((src, HeartbeatAck(message.ballot, self.learned)))
            else:
                eff.send.append((src, Nack(self.promised)))
        elif isinstance(message, HeartbeatAck) and self.leading and message.ballot == self.ballot:
            self.heard[src] = now
            self._send_learned(src, message.learned, eff)
        return eff

    # -- leadership -----------------------------------------------------------------
    def _reset_deadline(self, now: float) -> None:
        low, high = self.config.election_timeout
        self.deadline = now + low + (high - low) * self.rng.random()

    def _see_round(self, round_: int) -> None:
        self.max_round = max(self.max_round, round_)

    def _majority_heard(self, now: float) -> bool:
        window = self.config.election_timeout[1]
        heard = sum(1 for p in self.peers if now - self.heard.get(p, self.led_since) <= window)
        return heard + 1 >= self.quorum

    def _follow(self, ballot: Ballot, now: float, eff: Effects) -> None:
        self._see_round(ballot[0])
        if ballot[1] != self.node_id and (self.leading or self.preparing):
            self._stand_down(eff)
        self.leader = ballot[1]
        self._reset_deadline(now)
        eff.wake_at = self.deadline

    def _stand_down(self, eff: Effects) -> None:
        # Proposals in flight may still be chosen by a later leader: their outcome is
        # unknown here, so clients time out and retry (de-duplicated by (client, seq)).
        if self.leading or self.preparing:
            eff.events.append(("stand-down", self.ballot))
        self.leading = self.preparing = False
        self.leader = None
        self.waiting.clear()
        self.queued.clear()
        self.proposals.clear()
        self.acks.clear()

    def _campaign(self, now: float, eff: Effects) -> None:
        self.max_round += 1
        self.ballot = (self.max_round, self.node_id)
        self.leader = None
        self._reset_deadline(now)
        if self.config.bug == "no-phase1":  # trusts its own acceptor's memory alone
            self._lead(now, {s: v for s, v in self.accepted.items() if s > self.learned}, eff)
            return
        self.preparing = True
        self.promises = {}
        message = Prepare(self.ballot, self.learned + 1)
        eff.send.extend((p, message) for p in self.peers)
        self._on_prepare(self.node_id, message, eff, now)

    def _on_prepare(self, src: NodeId, message: Prepare, eff: Effects, now: float) -> None:
        self._see_round(message.ballot[0])
        if message.ballot < self.promised:  # equal: a retransmission from the same proposer
            eff.send.append((src, Nack(self.promised)))
            return
        self.promised = message.ballot
        accepted = tuple(
            (slot, ballot, value)
            for slot, (ballot, value) in sorted(self.accepted.items())
            if slot >= message.from_slot
        )
        promise = Promise(message.ballot, accepted)
        if src == self.node_id:
            self.promises[self.node_id] = promise
        else:
            if self.leading or self.preparing:
                self._stand_down(eff)
            self.leader = None
            # Give the candidate a full timeout to finish phase 1 before competing.
            self._reset_deadline(now)
            eff.wake_at = self.deadline
            eff.events.append(("promise", message.ballot))
            eff.send.append((src, promise))

    def _on_promise(self, src: NodeId, message: Promise, now: float, eff: Effects) -> None:
        if not self.preparing or message.ballot != self.ballot:
            return
        self.promises[src] = message
        if len(self.promises) < self.quorum:
            return
        # Re-propose, per slot, the value of the highest ballot any promise reported.
        best: dict[int, tuple[Ballot, Any]] = {}
        for promise in self.promises.values():
            for slot, ballot, value in promise.accepted:
                if slot not in best or ballot > best[slot][0]:
                    best[slot] = (ballot, value)
        self._lead(now, best, eff)

    def _lead(self, now: float, best: Mapping[int, tuple[Ballot, Any]], eff: Effects) -> None:
        self.preparing = False
        self.leading = True
        self.leader = self.node_id
        self.led_since = now
        self.heard = {}
        self.proposals = {}
        self.acks = {}
        self.next_slot = max([self.learned, *best]) + 1
        eff.events.append(("leader", self.ballot))
        self._heartbeat(eff)
        self.deadline = now + self.config.heartbeat
        for slot in range(self.learned + 1, self.next_slot):
            if slot not in self.chosen:
                value = best[slot][1] if slot in best else None  # a gap gets a no-op
                self._send_accept(slot, value, eff)
        queued, self.queued = self.queued, []
        for request in queued:
            self._propose(request, eff)
            self.waiting[self.next_slot - 1] = request

    def _heartbeat(self, eff: Effects) -> None:
        message = Heartbeat(self.ballot, self.learned)
        eff.send.extend((p, message) for p in self.peers)
        # Retransmit what is not yet chosen: a lost accept must not stall its slot.
        for slot, value in sorted(self.proposals.items()):
            if slot not in self.chosen:
                accept = Accept(self.ballot, slot, value)
                eff.send.extend((p, accept) for p in self.peers if p not in self.acks[slot])

    # -- phase 2 ------------------------------------------------------------------
    def _propose(self, value: Any, eff: Effects) -> None:
        slot = self.next_slot
        self.next_slot += 1
        self._send_accept(slot, value, eff)

    def _send_accept(self, slot: int, value: Any, eff: Effects) -> None:
        self.proposals[slot] = value
        self.acks[slot] = set()
        message = Accept(self.ballot, slot, value)
        eff.send.extend((p, message) for p in self.peers)
        self._on_accept(self.node_id, message, None, eff)

    def _on_accept(self, src: NodeId, message: Accept, now: float | None, eff: Effects) -> None:
        self._see_round(message.ballot[0])
        if message.ballot < self.promised:
            if src == self.node_id:  # our own acceptor promised a higher ballot meanwhile
                self._stand_down(eff)
            else:
                eff.send.append((src, Nack(self.promised)))
            return
        self.promised = message.ballot
        if src != self.node_id and now is not None:
            self._follow(message.ballot, now, eff)
        self.accepted[message.slot] = (message.ballot, message.value)
        eff.events.append(("accepted", message.slot, message.ballot, message.value))
        if src == self.node_id:
            self._on_accepted(self.node_id, Accepted(message.ballot, message.slot), now, eff)
        else:
            eff.send.append((src, Accepted(message.ballot, message.slot)))

    def _on_accepted(self, src: NodeId, message: Accepted, now: float | None, eff: Effects) -> None:
        if not self.leading or message.ballot != self.ballot:
            return
        if now is not None:
            self.heard[src] = now
        acks = self.acks.get(message.slot)
        if acks is None or message.slot in self.chosen:
            return
        acks.add(src)
        if len(acks) >= self.quorum:
            chosen = ((message.slot, self.proposals[message.slot]),)
            eff.send.extend((p, Commit(chosen)) for p in self.peers)
            self._learn(chosen, eff)

    # -- learning -----------------------------------------------------------------
    def _learn(self, chosen: tuple[tuple[int, Any], ...], eff: Effects) -> None:
        for slot, value in chosen:
            if slot in self.chosen or slot <= len(self.log):
                continue
            self.chosen[slot] = value
            eff.events.append(("commit", slot, value))
        while len(self.log) + 1 in self.chosen:
            slot = len(self.log) + 1
            value = self.chosen.pop(slot)
            self.log.append(value)
            self.proposals.pop(slot, None)
            self.acks.pop(slot, None)
            eff.events.append(("apply", slot, value))
            waiting = self.waiting.pop(slot, None)
            if value is not None:
                reply = self.sm.apply(value)
                if waiting == value:  # another value may have taken the slot: no answer
                    eff.replies.append(reply)

    def _send_learned(self, peer: NodeId, peer_learned: int, eff: Effects) -> None:
        last = min(len(self.log), peer_learned + self.config.max_batch)
        if last > peer_learned:
            chosen = tuple((slot, self.log[slot - 1]) for slot in range(peer_learned + 1, last + 1))
            eff.send.append((peer, Commit(chosen)))

    @property
    def learned(self) -> int:
        """Slots 1..learned are chosen and applied here."""
        return len(self.log)


__all__ = [
    "MultiPaxos",
    "PaxosConfig",
    "Prepare",
    "Promise",
    "Accept",
    "Accepted",
    "Nack",
    "Commit",
    "Heartbeat",
    "HeartbeatAck",
    "PAXOS_BUGS",
]
