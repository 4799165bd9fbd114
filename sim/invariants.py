"""Protocol invariants checked over the events the nodes emitted during one run.

`check_invariants(algorithm, events, ...)` takes the kernel's `events`, a list of
`(virtual time, node_id, event)` in the order they happened, and returns the
`Violation`s found (an empty list: every invariant held). It trusts nothing a node
concludes: it rebuilds logs, quorums and the replicated state from the raw events.

Raft (events of `twlb.sim.raft`):
  election-safety        at most one leader per term;
  log-matching           two logs holding an entry of the same index and term hold the
                         same entries up to it (checked by a hash chain over each log);
  leader-completeness    a leader's log, when it is elected, holds every entry
                         committed before;
  state-machine-safety   no two nodes commit or apply different entries at one index,
                         and each node applies indexes in order.
Multi-Paxos (`twlb.sim.paxos`):
  one-value-per-slot     acceptors' votes never make two values chosen for a slot, and
                         no node learns a value a majority did not accept;
  applied-in-order       each node applies slots 1, 2, 3, ... with the chosen values.
PBFT (`twlb.sim.pbft`), over the correct replicas only (the byzantine set excluded):
  fault-bound            at most f = (n - 1) // 3 replicas are Byzantine;
  agreement              no two correct replicas execute different requests at one
                         sequence number, each in order;
  validity               every executed request was sent by a client, and each correct
                         replica's answers are those of executing the agreed order.
All:
  progress               when every fault has healed (`healed_at`) and clients keep
                         asking, some client operation commits within `progress_within`
                         seconds (defaults in `PROGRESS_WITHIN`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twlb.protocol import ClientRequest, KVStateMachine, bft_faults, quorum

Event = tuple[float, str, tuple[Any, ...]]

# Seconds after the last heal within which a client operation must commit. Raft and
# Paxos need an election (timeouts <= 0.3 s by default) and a few round trips; PBFT may
# need view changes whose timeout doubles up to 8x its 1 s base before one succeeds.
PROGRESS_WITHIN = {"raft": 5.0, "paxos": 5.0, "pbft": 20.0}


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    detail: str
    time: float | None = None

    @property
    def name(self) -> str:
        return self.invariant

    def __str__(self) -> str:
        at = "" if self.time is None else f" at t={self.time:.3f}s"
        return f"{self.invariant}{at}: {self.detail}"


def check_invariants(
    algorithm: str,
    events: Sequence[Event],
    *,
    nodes: Iterable[str] = (),
    byzantine: Iterable[str] = frozenset(),
    healed_at: float | None = None,
    end: float | None = None,
    progress_within: float | None = None,
    **_context: Any,
) -> list[Violation]:
    """Every violation of `algorithm`'s invariants in `events` (see the module doc).
    Other keyword arguments of the runner's context (faults, ...) are accepted and
    not needed."""
    members = set(nodes) or {node for _, node, _ in events}
    byzantine = frozenset(byzantine)
    if algorithm == "raft":
        found = _check_raft(events)
    elif algorithm == "paxos":
        found = _check_paxos(events, len(members))
    elif algorithm == "pbft":
        found = _check_pbft(events, len(members), byzantine)
    else:
        raise ValueError(f"no invariants for algorithm {algorithm!r}; known: raft, paxos, pbft")
    if healed_at is not None:
        if end is None:
            end = events[-1][0] if events else healed_at
        within = PROGRESS_WITHIN[algorithm] if progress_within is None else progress_within
        correct = [e for e in events if e[1] not in byzantine]
        found.extend(check_progress(healed_at, correct, within=within, end=end))
    return found


def check_progress(
    healed_at: float, events: Sequence[Event], *, within: float, end: float
) -> list[Violation]:
    """Progress after faults heal: take the first client request a node receives at or
    after `healed_at` early enough that `within` seconds fit before `end`; some node must
    commit a client operation (not a no-op) between `healed_at` and that request's time
    plus `within`. No request in that span: nothing was asked, nothing to check."""
    first_request = next(
        (t for t, _, e in events if e[0] == "request" and healed_at <= t <= end - within), None
    )
    if first_request is None:
        return []
    deadline = first_request + within
    for t, _, event in events:
        if (
            healed_at <= t <= deadline
            and event[0] in ("commit", "execute")
            and _client_operation(event) is not None
        ):
            return []
    return [
        Violation(
            "progress",
            f"faults healed at {healed_at:.3f}s and clients asked at {first_request:.3f}s, "
            f"but no client operation committed by {deadline:.3f}s ({within:g}s later)",
            deadline,
        )
    ]


def _client_operation(event: tuple[Any, ...]) -> ClientRequest | None:
    for field in event[1:]:
        if isinstance(field, ClientRequest):
            return field
    return None


def _chain(previous: int, term: Any, request: Any) -> int:
    try:
        return hash((previous, term, request))
    except TypeError:  # an unhashable value inside an operation
        return hash((previous, term, repr(request)))


def _check_applied_in_order(
    name: str, t: float, node: str, index: int, value: Any, applied: dict[str, int], out: list
) -> None:
    expected = applied.get(node, 0) + 1
    if index != expected:
        out.append(
            Violation(name, f"{node} applied index {index} after {expected - 1} ({value!r})", t)
        )
    applied[node] = index


def _check_raft(events: Sequence[Event]) -> list[Violation]:
    out: list[Violation] = []
    leaders: dict[int, str] = {}
    logs: dict[str, list[tuple[int, Any, int]]] = defaultdict(list)  # (term, request, chain)
    chain_at: dict[tuple[int, int], tuple[int, str]] = {}  # (index, term) -> chain, node
    committed: dict[int, tuple[int, Any, str]] = {}  # index -> term, request, node
    applied_value: dict[int, tuple[Any, str]] = {}
    applied: dict[str, int] = {}
    for t, node, event in events:
        kind = event[0]
        if kind == "start":
            applied[node] = 0  # the state machine is rebuilt from the log after a restart
            if not event[1]:
                logs[node] = []
        elif kind == "leader":
            term = event[1]
            other = leaders.setdefault(term, node)
            if other != node:
                out.append(
                    Violation("election-safety", f"{other} and {node} both lead term {term}", t)
                )
            log = logs[node]
            for index, (c_term, request, by) in sorted(committed.items()):
                if index > len(log) or log[index - 1][0] != c_term:
                    out.append(
                        Violation(
                            "leader-completeness",
                            f"{node} leads term {term} without entry {index} (term {c_term}, "
                            f"{request!r}) committed by {by}",
                            t,
                        )
                    )
                    break
        elif kind == "truncate":
            del logs[node][event[1] - 1 :]
        elif kind == "append":
            index, term, request = event[1], event[2], event[3]
            log = logs[node]
            if index != len(log) + 1:
                out.append(
                    Violation("log-matching", f"{node} appended index {index} to {len(log)}", t)
                )
                continue
            chain = _chain(log[-1][2] if log else 0, term, request)
            log.append((term, request, chain))
            seen = chain_at.setdefault((index, term), (chain, node))
            if seen[0] != chain:
                out.append(
                    Violation(
                        "log-matching",
                        f"{node} and {seen[1]} hold an entry of index {index} term {term} "
                        "with different logs up to it",
                        t,
                    )
                )
        elif kind == "commit":
            index, term, request = event[1], event[2], event[3]
            seen = committed.setdefault(index, (term, request, node))
            if seen[:2] != (term, request):
                out.append(
                    Violation(
                        "state-machine-safety",
                        f"index {index} committed as (term {seen[0]}, {seen[1]!r}) by {seen[2]} "
                        f"and as (term {term}, {request!r}) by {node}",
                        t,
                    )
                )
        elif kind == "apply":
            index, request = event[1], event[2]
            seen = applied_value.setdefault(index, (request, node))
            if seen[0] != request:
                out.append(
                    Violation(
                        "state-machine-safety",
                        f"index {index} applied as {seen[0]!r} by {seen[1]} and as {request!r} "
                        f"by {node}",
                        t,
                    )
                )
            _check_applied_in_order("state-machine-safety", t, node, index, request, applied, out)
    return out


def _check_paxos(events: Sequence[Event], n: int) -> list[Violation]:
    out: list[Violation] = []
    majority = quorum(n)
    votes: dict[tuple[int, Any], dict[str, Any]] = defaultdict(dict)  # (slot, ballot) -> node
    chosen: dict[int, tuple[Any, Any]] = {}  # slot -> value, ballot
    learned: dict[int, tuple[Any, str]] = {}
    applied: dict[str, int] = {}
    for t, node, event in events:
        kind = event[0]
        if kind == "start":
            applied[node] = 0
        elif kind == "accepted":
            slot, ballot, value = event[1], event[2], event[3]
            voters = votes[(slot, ballot)]
            voters[node] = value
            counted = sum(1 for v in voters.values() if v == value)
            if counted >= majority:
                seen = chosen.setdefault(slot, (value, ballot))
                if seen[0] != value:
                    out.append(
                        Violation(
                            "one-value-per-slot",
                            f"slot {slot}: {seen[0]!r} chosen in ballot {seen[1]} and "
                            f"{value!r} chosen in ballot {ballot}",
                            t,
                        )
                    )
        elif kind == "commit":
            slot, value = event[1], event[2]
            if slot not in chosen:
                out.append(
                    Violation(
                        "one-value-per-slot",
                        f"{node} learned {value!r} for slot {slot}, which no majority accepted",
                        t,
                    )
                )
            seen = learned.setdefault(slot, (value, node))
            if seen[0] != value:
                out.append(
                    Violation(
                        "one-value-per-slot",
                        f"slot {slot} learned as {seen[0]!r} by {seen[1]} and as {value!r} by "
                        f"{node}",
                        t,
                    )
                )
        elif kind == "apply":
            slot, value = event[1], event[2]
            if slot in learned and learned[slot][0] != value:
                out.append(
                    Violation(
                        "applied-in-order",
                        f"{node} applied {value!r} at slot {slot}, chosen was {learned[slot][0]!r}",
                        t,
                    )
                )
            _check_applied_in_order("applied-in-order", t, node, slot, value, applied, out)
    return out


def _check_pbft(events: Sequence[Event], n: int, byzantine: frozenset[str]) -> list[Violation]:
    out: list[Violation] = []
    f = bft_faults(n)
    if len(byzantine) > f:
        out.append(
            Violation(
                "fault-bound",
                f"{len(byzantine)} Byzantine replicas ({sorted(byzantine)}) but n={n} "
                f"tolerates f={f}: agreement is not promised",
            )
        )
    asked: set[ClientRequest] = set()
    executed: dict[int, tuple[Any, str]] = {}  # seq -> request, replica
    answers: dict[int, list[tuple[str, Any, float]]] = defaultdict(list)
    last: dict[str, int] = {}
    for t, node, event in events:
        kind = event[0]
        if kind == "request":
            asked.add(ClientRequest(event[1], event[2], event[3]))
        if node in byzantine:
            continue
        if kind == "start":
            last[node] = event[2] if len(event) > 2 else 0
        elif kind == "state-transfer":
            last[node] = event[1]
        elif kind == "execute":
            seq, request, answer = event[1], event[2], event[3]
            seen = executed.setdefault(seq, (request, node))
            if seen[0] != request:
                out.append(
                    Violation(
                        "agreement",
                        f"sequence {seq} executed as {seen[0]!r} by {seen[1]} and as "
                        f"{request!r} by {node}",
                        t,
                    )
                )
            _check_applied_in_order("agreement", t, node, seq, request, last, out)
            if request is not None and request not in asked:
                out.append(
                    Violation("validity", f"{node} executed {request!r}, which no client sent", t)
                )
            if seen[0] == request:  # a disagreeing replica is reported above already
                answers[seq].append((node, answer, t))
    # Replay the agreed order from sequence 1 up to the first sequence nobody executed.
    sm = KVStateMachine()
    seq = 1
    while seq in executed:
        request = executed[seq][0]
        if request is not None:
            reply = sm.apply(request)
            expected = (reply.ok, reply.value)
            for node, answer, t in answers[seq]:
                if answer != expected:
                    out.append(
                        Violation(
                            "validity",
                            f"{node} answered {answer!r} for {request!r} at sequence {seq}; "
                            f"executing the agreed order gives {expected!r}",
                            t,
                        )
                    )
        seq += 1
    return out


__all__ = ["Violation", "check_invariants", "check_progress", "PROGRESS_WITHIN"]
