"""The linearizability checker: is there a total order of a history's operations that
respects real time and the sequential specification of a register or key-value map?

The search is Wing and Gong's, with Lowe's memoisation, as Porcupine does it: the
invocations and completions form a linked list in time order; the search tries to
linearize the earliest pending invocation whose model step is legal, removes it from the
list, and backtracks when it meets a completion whose operation was not linearized yet.
A configuration (set of linearized operations as an integer bitset, model state) seen
once is never explored again, which is what makes it fast. An operation whose outcome
is unknown (`info`, or never completed) gets its completion after everything else: it
may take effect at any point after its invocation, and taking effect at the very end is
the same as never to every observer.

P-compositionality: a history of many keys is linearizable iff each key's sub-history
is, so keys are checked alone (exact, and exponentially cheaper). When a key fails, the
shortest failing prefix of its sub-history is found by bisection (a prefix of a
linearizable history is linearizable, with operations still open at the cut taken as
unknown), and reported.

Models: `register` (read, write, cas) and `kv` (register operations plus append, on
string values); both start with no value, and the empty string reads as no value.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twlb.sim.history import History, HistoryError, HistoryEvent, Op, pair_operations

MODELS: dict[str, frozenset[str]] = {
    "register": frozenset({"read", "write", "cas"}),
    "kv": frozenset({"read", "write", "cas", "append"}),
}


class SearchBudgetExceeded(RuntimeError):
    """The search visited more configurations than allowed: no verdict."""


def _norm(value: Any) -> Any:
    return None if value == "" else value


def step(state: Any, f: str, arg: Any, output: Any) -> tuple[bool, Any]:
    """The sequential specification: is `f(arg) -> output` legal in `state`, and the
    state after it. For cas, output True (swapped), False (value was not FROM) or None
    (unknown: either, as the state decides)."""
    if f == "read":
        return _norm(output) == state, state
    if f == "write":
        return True, _norm(arg)
    if f == "append":
        return True, _norm((state or "") + str(arg))
    expected, new = arg
    matches = state == _norm(expected)
    if output is None:
        return True, (_norm(new) if matches else state)
    if output:
        return matches, _norm(new)
    return not matches, state


@dataclass(slots=True)
class Search:
    linearizable: bool
    states: int  # configurations explored
    order: list[int] = field(default_factory=list)  # a linearization, when there is one


def search(ops: Sequence[Op], max_states: int | None = None) -> Search:
    """Decide one key's history. `ops` carry start/end positions in one time order."""
    n = len(ops)
    if n == 0:
        return Search(True, 0)
    # Entries 1..2n; 0 is the list head. A completion sorts after every invocation at
    # its position; unknown completions sort after everything, in invocation order.
    never = max(max(op.start for op in ops), max((op.end or 0) for op in ops)) + 1
    points = []
    for i, op in enumerate(ops):
        points.append((op.start, 0, i))
        points.append((never + i if op.end is None else op.end, 1, i))
    points.sort()
    size = 2 * n + 1
    nxt = [0] * size
    prv = [0] * size
    is_call = [False] * size
    op_of = [0] * size
    call_entry = [0] * n
    ret_entry = [0] * n
    for e, (_pos, kind, i) in enumerate(points, 1):
        is_call[e] = kind == 0
        op_of[e] = i
        if kind == 0:
            call_entry[i] = e
        else:
            ret_entry[i] = e
        prv[e] = e - 1
        nxt[e - 1] = e
    nxt[size - 1] = -1
    fs = [op.f for op in ops]
    args = [op.value for op in ops]
    outs = [op.output for op in ops]

    state: Any = None
    linearized = 0
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any]] = []
    explored = 0
    e = nxt[0]
    while nxt[0] != -1:
        if is_call[e]:
            i = op_of[e]
            legal, new_state = step(state, fs[i], args[i], outs[i])
            if legal:
                marked = linearized | (1 << i)
                config = (marked, new_state)
                if config not in cache:
                    cache.add(config)
                    explored += 1
                    if max_states is not None and explored > max_states:
                        raise SearchBudgetExceeded(f"more than {max_states} configurations")
                    stack.append((e, state))
                    state, linearized = new_state, marked
                    # lift the invocation and its completion out of the list
                    r = ret_entry[i]
                    nxt[prv[e]] = nxt[e]
                    prv[nxt[e]] = prv[e]
                    nxt[prv[r]] = nxt[r]
                    if nxt[r] != -1:
                        prv[nxt[r]] = prv[r]
                    e = nxt[0]
                    continue
            e = nxt[e]
        else:
            if not stack:
                return Search(False, explored)
            e, state = stack.pop()
            i = op_of[e]
            linearized &= ~(1 << i)
            # unlift: the completion first, then the invocation
            r = ret_entry[i]
            nxt[prv[r]] = r
            if nxt[r] != -1:
                prv[nxt[r]] = r
            nxt[prv[e]] = e
            prv[nxt[e]] = e
            e = nxt[e]
    return Search(True, explored, [op_of[entry] for entry, _s in stack])


@dataclass(slots=True)
class KeyVerdict:
    key: str | None
    operations: int
    linearizable: bool
    states: int
    seconds: float


@dataclass(slots=True)
class Verdict:
    model: str
    linearizable: bool
    keys: list[KeyVerdict]
    seconds: float
    failing_key: str | None = None
    # The shortest prefix of the failing key's events that cannot be linearized.
    prefix: list[HistoryEvent] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "linearizable": self.linearizable,
            "keys": len(self.keys),
            "operations": sum(k.operations for k in self.keys),
            "states_explored": sum(k.states for k in self.keys),
            "seconds": round(self.seconds, 6),
            "failing_key": self.failing_key,
            "failing_prefix_events": len(self.prefix),
            "failing_prefix": [e.to_edn() for e in self.prefix],
        }


def check_operations(ops: Sequence[Op], model: str, max_states: int | None = None) -> Search:
    allowed = MODELS[model]
    for op in ops:
        if op.f not in allowed:
            raise HistoryError(f"model {model!r} has no :{op.f} operation (process {op.process})")
    return search(ops, max_states)


def check_history(
    history: History | Sequence[HistoryEvent],
    model: str = "kv",
    *,
    shortest_prefix: bool = True,
    max_states: int | None = None,
) -> Verdict:
    """Check a whole history, key by key; on failure, find the shortest failing prefix."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    events = list(history)
    started = time.perf_counter()
    by_key: dict[str | None, list[Op]] = defaultdict(list)
    for op in pair_operations(events):
        by_key[op.key].append(op)
    verdicts: list[KeyVerdict] = []
    failing: list[str | None] = []  # the first key that fails (None is a key: etcd logs)
    for key in sorted(by_key, key=lambda k: (k is not None, str(k))):
        t0 = time.perf_counter()
        result = check_operations(by_key[key], model, max_states)
        verdicts.append(
            KeyVerdict(
                key, len(by_key[key]), result.linearizable, result.states, time.perf_counter() - t0
            )
        )
        if not result.linearizable:
            failing.append(key)
            break
    verdict = Verdict(model, not failing, verdicts, 0.0)
    if failing:
        verdict.failing_key = failing[0]
        if shortest_prefix:
            verdict.prefix = shortest_failing_prefix(
                [e for e in events if e.key == failing[0]], model, max_states
            )
    verdict.seconds = time.perf_counter() - started
    return verdict


def shortest_failing_prefix(
    events: Sequence[HistoryEvent], model: str, max_states: int | None = None
) -> list[HistoryEvent]:
    """Bisection on prefix length: prefixes of a linearizable history are linearizable."""
    low, high = 0, len(events)  # events[:low] is linearizable; events[:high] is not
    while high - low > 1:
        mid = (low + high) // 2
        if check_operations(pair_operations(events[:mid]), model, max_states).linearizable:
            low = mid
        else:
            high = mid
    return list(events[:high])


__all__ = [
    "MODELS",
    "Verdict",
    "KeyVerdict",
    "Search",
    "SearchBudgetExceeded",
    "check_history",
    "check_operations",
    "search",
    "shortest_failing_prefix",
    "step",
]
