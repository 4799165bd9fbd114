"""Raft (Ongaro and Ousterhout 2014) as a sans-IO state machine for `twlb.sim`.

Election with randomized timeouts drawn from the node's rng and an optional pre-vote
round (a partitioned node does not inflate terms), log replication with fast back-up
of `next_index`, commit of current-term entries only (counted by replicas), a no-op
appended by each new leader so earlier entries commit promptly, and client operations
(reads included) carried through the log, so every answer is linearizable. Term, vote
and log are the persistent state; commit index and the key-value state machine are
rebuilt after a crash by re-applying committed entries. Requests are de-duplicated by
(client, seq) in `KVStateMachine`; a follower redirects the client (`leader_hint`).

Events for the checkers (`twlb.sim.invariants`), without the node id the kernel adds:
  ("start", recovered)            ("request", client, seq, operation)
  ("role", role, term)            ("leader", term)
  ("truncate", from_index)        ("append", index, term, request|None)
  ("commit", index, term, request|None)   ("apply", index, request|None)

Also ("vote", term, candidate) when a real (not pre-) vote is granted: the nemesis
(`twlb.sim.nemesis`) crashes a node in the instant after it voted.

Deliberately broken variants (config `bug`), to show the checkers can fail:
  "double-vote"      grants a vote to every candidate of a term, not only the first;
  "commit-old-term"  commits any entry stored on a majority, whatever its term, and
                     appends no no-op on election (Figure 8 of the Raft paper);
  "vote-without-log-check"  grants votes and pre-votes without the check that the
                     candidate's log is at least as up to date (§5.4.1);
  "forget-vote"      comes back from a crash without the vote it had persisted, so it
                     may vote twice in one term.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
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

RAFT_BUGS = frozenset({"double-vote", "commit-old-term", "vote-without-log-check", "forget-vote"})
# A node's clock may be skewed, and the kernel converts its wake time to global time and
# back in floating point: a timer can fire a hair before the deadline it was set for.
TIMER_SLACK = 1e-9


class Role(StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    request: ClientRequest | None  # None: the no-op a new leader appends


@dataclass(frozen=True, slots=True)
class RequestVote:
    term: int  # for a pre-vote: the term the candidate would stand in
    last_index: int
    last_term: int
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class VoteReply:
    term: int
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class AppendEntries:
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendReply:
    term: int
    success: bool
    match_index: int  # on success: last index known to match; on failure: a back-up hint


@dataclass(frozen=True)
class RaftConfig:
    # Several round trips of the CLI's default 10-100 ms latency (Raft §9.3: broadcast
    # time << election timeout), so an election finishes before another timer fires.
    election_timeout: tuple[float, float] = (0.3, 0.6)
    heartbeat: float = 0.05
    pre_vote: bool = True
    max_batch: int = 64
    bug: str | None = None

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> RaftConfig:
        timeout, heartbeat, bug = leader_timing(
            "raft", config, cls.election_timeout, cls.heartbeat, RAFT_BUGS
        )
        return cls(
            timeout,
            heartbeat,
            bool(config.get("pre_vote", True)),
            int(config.get("max_batch", cls.max_batch)),
            bug,
        )


class Raft:
    """One Raft server; see the module docstring."""

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
        self.config = RaftConfig.from_mapping(config)
        self.quorum = quorum(len(self.peers) + 1)
        # Persistent state.
        self.term = 0
        self.voted_for: NodeId | None = None
        self.log: list[Entry] = []  # entry i (1-based) is log[i - 1]
        # Volatile state.
        self.recovered = False
        self.role = Role.FOLLOWER
        self.leader: NodeId | None = None
        self.commit_index = 0
        self.last_applied = 0
        self.sm = KVStateMachine()
        self.votes: set[NodeId] = set()
        self.election_deadline = 0.0
        self.heard_leader_at = float("-inf")
        self.next_index: dict[NodeId, int] = {}
        self.probing: dict[NodeId, bool] = {}  # True until an append to the peer succeeds
        self.match_index: dict[NodeId, int] = {}
        self.next_heartbeat = 0.0
        self.led_since = 0.0
        self.acked_at: dict[NodeId, float] = {}
        self.waiting: dict[int, ClientRequest] = {}  # log index -> request to answer
        self.in_log: set[ClientRequest] = set()  # the requests of `waiting`

    # -- contract -----------------------------------------------------------------
    @classmethod
    def recover(
        cls,
        node_id: NodeId,
        peers: Sequence[NodeId],
        rng: random.Random,
        config: Mapping[str, Any],
        state: Mapping[str, Any],
    ) -> Raft:
        node = cls(node_id, peers, rng, config)
        node.term = state["term"]
        node.voted_for = None if node.config.bug == "forget-vote" else state["voted_for"]
        node.log = list(state["log"])
        node.recovered = True
        return node

    def persistent_state(self) -> Mapping[str, Any]:
        return {"term": self.term, "voted_for": self.voted_for, "log": tuple(self.log)}

    def leadership(self) -> int | None:
        """The term this node leads, if it believes it leads (for a nemesis that aims)."""
        return self.term if self.role is Role.LEADER else None

    def start(self, now: float) -> Effects:
        eff = Effects(events=[("start", self.recovered), ("role", self.role.value, self.term)])
        self._reset_election_timer(now)
        eff.wake_at = self.election_deadline
        return eff

    def on_timer(self, now: float) -> Effects:
        eff = Effects()
        if self.role is Role.LEADER:
            if not self._quorum_heard(now):
                # Check-quorum: a leader cut off from a majority stands down, so clients
                # stop waiting on it and look for the leader of the majority.
                self._step_down(self.term, now, eff)
                return eff
            if now + TIMER_SLACK >= self.next_heartbeat:
                for peer in self.peers:
                    self._send_append(peer, eff)
                self.next_heartbeat = now + self.config.heartbeat
            eff.wake_at = self.next_heartbeat
            return eff
        if now + TIMER_SLACK >= self.election_deadline:
            if self.config.pre_vote:
                self._become(Role.PRE_CANDIDATE, eff)
                self.votes = {self.node_id}
                self._ask_votes(self.term + 1, True, eff)
            else:
                self._start_election(eff)
            self._reset_election_timer(now)
            self._maybe_win(eff, now)
        eff.wake_at = self.election_deadline
        return eff

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        eff = Effects(events=[("request", request.client, request.seq, request.op)])
        if self.role is not Role.LEADER:
            eff.replies.append(
                ClientReply(
                    request.client, request.seq, False, leader_hint=self.leader, error="not-leader"
                )
            )
            return eff
        if request in self.in_log:  # a retry of an operation already in the log
            return eff
        self._append(Entry(self.term, request), eff)
        self.waiting[len(self.log)] = request
        self.in_log.add(request)
        self.match_index[self.node_id] = len(self.log)
        for peer in self.peers:
            # A peer in the replicate state has been sent everything before this entry:
            # send it just this one. A probing peer waits for its reply or a heartbeat.
            if not self.probing[peer] and self.next_index[peer] == len(self.log):
                self._send_append(peer, eff)
        self._advance_commit(eff)
        return eff

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        eff = Effects()
        term = message.term
        if isinstance(message, RequestVote) and message.pre_vote:
            self._on_pre_vote(src, message, now, eff)
            return eff
        if term > self.term:
            if isinstance(message, VoteReply) and message.pre_vote and message.granted:
                pass  # a granted pre-vote carries the proposed term, not a real one
            else:
                self._step_down(term, now, eff)
        if isinstance(message, RequestVote):
            self._on_request_vote(src, message, now, eff)
        elif isinstance(message, VoteReply):
            self._on_vote_reply(src, message, now, eff)
        elif isinstance(message, AppendEntries):
            self._on_append(src, message, now, eff)
        elif isinstance(message, AppendReply):
            self._on_append_reply(src, message, now, eff)
        return eff

    def _quorum_heard(self, now: float) -> bool:
        window = self.config.election_timeout[1]
        heard = sum(1 for p in self.peers if now - self.acked_at.get(p, self.led_since) <= window)
        return heard + 1 >= self.quorum

    # -- elections ----------------------------------------------------------------
    def _reset_election_timer(self, now: float) -> None:
        low, high = self.config.election_timeout
        self.election_deadline = now + low + (high - low) * self.rng.random()

    def _become(self, role: Role, eff: Effects) -> None:
        if role is not self.role:
            self.role = role
            eff.events.append(("role", role.value, self.term))
            if role is not Role.LEADER:
                # Entries in flight may still commit under a later leader, so their
                # outcome is unknown here: answer nothing and let the client time out
                # and retry (the retry is de-duplicated by (client, seq)).
                self.waiting.clear()
                self.in_log.clear()

    def _step_down(self, term: int, now: float, eff: Effects) -> None:
        was_leader = self.role is Role.LEADER
        if term > self.term:  # a vote is per term: keep it when standing down in the same
            self.term = term
            self.voted_for = None
        self.leader = None
        self._become(Role.FOLLOWER, eff)
        if was_leader:  # its election timer went stale while it led
            self._reset_election_timer(now)
            eff.wake_at = self.election_deadline

    def _last(self) -> tuple[int, int]:
        return len(self.log), (self.log[-1].term if self.log else 0)

    def _ask_votes(self, term: int, pre_vote: bool, eff: Effects) -> None:
        last_index, last_term = self._last()
        message = RequestVote(term, last_index, last_term, pre_vote)
        eff.send.extend((peer, message) for peer in self.peers)

    def _start_election(self, eff: Effects) -> None:
        self.term += 1
        self.voted_for = self.node_id
        self.leader = None
        self.role = Role.FOLLOWER  # so that _become records the candidacy with its term
        self._become(Role.CANDIDATE, eff)
        self.votes = {self.node_id}
        self._ask_votes(self.term, False, eff)

    def _log_ok(self, message: RequestVote) -> bool:
        if self.config.bug == "vote-without-log-check":
            return True
        last_index, last_term = self._last()
        return (message.last_term, message.last_index) >= (last_term, last_index)

    def _on_pre_vote(self, src: NodeId, message: RequestVote, now: float, eff: Effects) -> None:
        # Grant only if we would vote in that term and have not heard a leader lately:
        # a node cut off from a healthy cluster cannot disrupt it when it returns.
        leader_alive = now - self.heard_leader_at < self.config.election_timeout[0]
        granted = message.term > self.term and self._log_ok(message) and not leader_alive
        reply_term = message.term if granted else self.term
        eff.send.append((src, VoteReply(reply_term, granted, True)))

    def _on_request_vote(self, src: NodeId, message: RequestVote, now: float, eff: Effects) -> None:
        free = self.voted_for in (None, src) or self.config.bug == "double-vote"
        granted = message.term == self.term and free and self._log_ok(message)
        if granted:
            self.voted_for = src
            eff.events.append(("vote", self.term, src))
            self._reset_election_timer(now)
            eff.wake_at = self.election_deadline
        eff.send.append((src, VoteReply(self.term, granted)))

    def _on_vote_reply(self, src: NodeId, message: VoteReply, now: float, eff: Effects) -> None:
        if not message.granted:
            return
        if message.pre_vote:
            if self.role is Role.PRE_CANDIDATE and message.term == self.term + 1:
                self.votes.add(src)
        elif self.role is Role.CANDIDATE and message.term == self.term:
            self.votes.add(src)
        self._maybe_win(eff, now)

    def _maybe_win(self, eff: Effects, now: float) -> None:
        if len(self.votes) < self.quorum:
            return
        if self.role is Role.PRE_CANDIDATE:
            self._start_election(eff)
            self._maybe_win(eff, now)  # a single-node cluster wins at once
        elif self.role is Role.CANDIDATE:
            self._become(Role.LEADER, eff)
            self.leader = self.node_id
            eff.events.append(("leader", self.term))
            last_index = len(self.log)
            self.next_index = {peer: last_index + 1 for peer in self.peers}
            self.probing = {peer: True for peer in self.peers}
            self.led_since = now
            self.acked_at = {}
            self.match_index = {peer: 0 for peer in self.peers}
            if self.config.bug != "commit-old-term":
                self._append(Entry(self.term, None), eff)
            self.match_index[self.node_id] = len(self.log)
            for peer in self.peers:
                self._send_append(peer, eff)
            self._advance_commit(eff)
            self.next_heartbeat = now + self.config.heartbeat
            eff.wake_at = self.next_heartbeat

    # -- replication --------------------------------------------------------------
    def _append(self, entry: Entry, eff: Effects) -> None:
        self.log.append(entry)
        eff.events.append(("append", len(self.log), entry.term, entry.request))

    def _send_append(self, peer: NodeId, eff: Effects) -> None:
        next_index = self.next_index[peer]
        prev_index = next_index - 1
        prev_term = self.log[prev_index - 1].term if prev_index > 0 else 0
        entries = tuple(self.log[prev_index : prev_index + self.config.max_batch])
        message = AppendEntries(self.term, prev_index, prev_term, entries, self.commit_index)
        eff.send.append((peer, message))
        if entries and not self.probing[peer]:
            # Pipelining (etcd's replicate state): count what is in flight as sent, so
            # each entry goes out once; a lost message shows as a refused append.
            self.next_index[peer] = prev_index + len(entries) + 1

    def _on_append(self, src: NodeId, message: AppendEntries, now: float, eff: Effects) -> None:
        if message.term < self.term:
            eff.send.append((src, AppendReply(self.term, False, 0)))
            return
        # A current-term leader exists: candidates and pre-candidates stand down.
        self._become(Role.FOLLOWER, eff)
        self.leader = src
        self.heard_leader_at = now
        self._reset_election_timer(now)
        eff.wake_at = self.election_deadline
        prev = message.prev_index
        if prev > len(self.log):
            eff.send.append((src, AppendReply(self.term, False, len(self.log) + 1)))
            return
        if prev > 0 and self.log[prev - 1].term != message.prev_term:
            # Back up past the whole conflicting term in one step.
            conflict_term = self.log[prev - 1].term
            first = prev
            while first > 1 and self.log[first - 2].term == conflict_term:
                first -= 1
            eff.send.append((src, AppendReply(self.term, False, first)))
            return
        index = prev
        for entry in message.entries:
            index += 1
            if index <= len(self.log):
                if self.log[index - 1].term == entry.term:
                    continue
                # Only a broken leader rewrites a committed entry; let the checkers see it.
                self.commit_index = min(self.commit_index, index - 1)
                self.last_applied = min(self.last_applied, index - 1)
                del self.log[index - 1 :]
                eff.events.append(("truncate", index))
            self._append(entry, eff)
        match = prev + len(message.entries)
        commit = min(message.commit, match)
        if commit > self.commit_index:
            self._commit_to(commit, eff)
        eff.send.append((src, AppendReply(self.term, True, match)))

    def _on_append_reply(self, src: NodeId, message: AppendReply, now: float, eff: Effects) -> None:
        if self.role is not Role.LEADER or message.term != self.term:
            return
        self.acked_at[src] = now
        if message.success:
            self.probing[src] = False
            if message.match_index > self.match_index[src]:
                self.match_index[src] = message.match_index
            self.next_index[src] = max(self.next_index[src], message.match_index + 1)
            self._advance_commit(eff)
            if self.next_index[src] <= len(self.log):
                self._send_append(src, eff)
        else:
            # Probe back from the follower's hint, never below what it is known to hold.
            hint = min(self.next_index[src] - 1, message.match_index)
            self.next_index[src] = max(self.match_index[src] + 1, hint, 1)
            self.probing[src] = True
            self._send_append(src, eff)

    def _advance_commit(self, eff: Effects) -> None:
        matches = sorted((self.match_index[n] for n in [self.node_id, *self.peers]), reverse=True)
        candidate = matches[self.quorum - 1]  # the highest index a majority stores
        if candidate <= self.commit_index:
            return
        if self.config.bug != "commit-old-term" and self.log[candidate - 1].term != self.term:
            return  # Raft §5.4.2: only current-term entries commit by counting replicas
        self._commit_to(candidate, eff)

    def _commit_to(self, index: int, eff: Effects) -> None:
        for i in range(self.commit_index + 1, index + 1):
            entry = self.log[i - 1]
            eff.events.append(("commit", i, entry.term, entry.request))
        self.commit_index = index
        while self.last_applied < self.commit_index:
            self.last_applied += 1
            request = self.log[self.last_applied - 1].request
            eff.events.append(("apply", self.last_applied, request))
            if request is None:
                continue
            reply = self.sm.apply(request)
            waiting = self.waiting.pop(self.last_applied, None)
            self.in_log.discard(waiting)
            if waiting is not None and self.role is Role.LEADER:
                eff.replies.append(reply)


__all__ = [
    "Raft",
    "RaftConfig",
    "Role",
    "Entry",
    "RequestVote",
    "VoteReply",
    "AppendEntries",
    "AppendReply",
    "RAFT_BUGS",
]
