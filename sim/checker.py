"""The linearizability checker: is there a total order of a history's operations that
respects real time and the sequential specification of a register or key-value map?

The search is Wing and Gong's with Lowe's memoisation, as Porcupine does it: the
invocations and completions form a linked list in time order; the search linearizes the
earliest pending invocation whose model step is legal, lifts it and its completion out
of the list, and backtracks when it meets a completion whose operation is not linearized
yet. A configuration (set of linearized operations, model state) seen once is never
explored again. The set is a base (every operation invoked before it is linearized) and
a bitset window from there, the state an interned integer, and the configuration one
integer built from them: it costs memory for what is still open, not for the length of
the history (Porcupine keeps a bitset of the whole history in each). An operation whose outcome is unknown (`info`, or
never completed) gets its completion after everything else: it may take effect at any
point after its invocation, and taking effect at the very end is the same as never to
every observer.

Beyond Porcupine, one reduction: an operation that is legal only in some states and never
changes the state (a read with its value, a compare-and-set that failed) is linearized
as soon as it is legal, with no alternative tried at that configuration. Whatever order
completes the history from there, the same order with that operation moved to the front
is legal too (it needs nothing placed later, constrains nothing placed later, and leaves
the state as it was), so no linearization is lost; and if that configuration was already
explored and failed, so has this one. Reads dominate real histories, so this cuts most of
the branching.

P-compositionality: a history of many keys is linearizable iff each key's sub-history
is. Keys are searched interleaved, a slice of steps each in turn, as Porcupine checks
them in parallel: the first key to fail decides the history and stops the others, so a
failing key is found in about (number of keys) x (its own cost), whatever the cost of the
keys that would take long.

When a key fails, the search itself says where: the furthest completion any
linearization reached (its "frontier"). Everything before that completion can be
linearized (the linearization that got there is kept); the operation completing there
cannot be placed after any of them. The failing prefix reported is the key's events up
to and including that completion, at no extra cost.

Budgets: every check is bounded in memory (the larger of its structures, counted, and
the process's resident growth since it began), and optionally in configurations per key
and in time; past one, `SearchBudgetExceeded` says how far the search got, and the
verdict is "undecided" (exit 3 on the command line).

Models: `register` (read, write, cas) and `kv` (register operations plus append, on
string values); both start with no value, and the empty string reads as no value.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twlb.sim.history import History, HistoryError, HistoryEvent, Op, pair_operations

MODELS: dict[str, frozenset[str]] = {
    "register": frozenset({"read", "write", "cas"}),
    "kv": frozenset({"read", "write", "cas", "append"}),
}

#: The memory a check may use for its searches unless told otherwise (bytes).
DEFAULT_MAX_MEMORY = 1024**3
#: Search steps one key runs before the next key's turn (and between budget checks).
SLICE = 20_000


class SearchBudgetExceeded(RuntimeError):
    """The search reached a budget before a verdict: undecided. `progress` says how far
    it got (see `Progress`)."""

    def __init__(
        self, message: str, progress: Progress | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.progress = progress
        self.reason = reason or message  # the budget reached, without the progress


class MemoryBudgetExceeded(SearchBudgetExceeded):
    """The searches' configurations outgrew the memory budget."""


class TimeBudgetExceeded(SearchBudgetExceeded):
    """The check ran past its time limit."""


def _norm(value: Any) -> Any:
    return None if value == "" else value


def step(state: Any, f: str, arg: Any, output: Any) -> tuple[bool, Any]:
    """The sequential specification: is `f(arg) -> output` legal in `state`, and the
    state after it. For cas, output True (swapped), False (value was not FROM) or None
    (unknown: either, as the state decides). The search runs a compiled form of the same
    rules (`_compile`); this one is the reference, and describes states on the page."""
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


# -- compiled form --------------------------------------------------------------------

# Operation kinds of the compiled model. READ and CAS_FAIL only observe the state; the
# _PLAIN kinds are the same operations searched without the observer reduction (as
# Porcupine searches them: the benchmark's reference).
READ, CAS_FAIL, WRITE, CAS_OK, CAS_ANY, APPEND, READ_PLAIN, CAS_FAIL_PLAIN = range(8)


def _intern_key(value: Any) -> tuple[type, Any]:
    # 1, 1.0 and True are equal in Python but not in a history.
    return (value.__class__, value)


def _check_append_values(ops: Sequence[Op]) -> None:
    """Appends concatenate strings: a key that also holds a non-string value (an integer
    written, compared or read) has no meaning under the kv model. Refused by line."""
    appends = [op for op in ops if op.f == "append"]
    if not appends:
        return
    for op in ops:
        values: list[Any] = []
        if op.f in ("write", "append"):
            values = [op.value]
        elif op.f == "cas":
            values = list(op.value)
        elif op.f == "read":
            values = [op.output]
        bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            first = appends[0]
            raise HistoryError(
                f"{_where(op)}: key {op.key!r} holds the non-string value {bad!r} "
                f"(:{op.f}), and {_where(first)} appends to it: appends need string values"
            )


def _where(op: Op) -> str:
    return f"line {op.line}" if op.line else f"event {op.start + 1}"


@dataclass(slots=True)
class Search:
    """One key's search: the verdict and what the search learned on the way."""

    linearizable: bool
    states: int  # configurations explored
    order: list[int] = field(default_factory=list)  # a linearization, when there is one
    # When not linearizable: the operations of the longest linearizable prefix, in the
    # order found, and the operation whose completion no linearization got past.
    longest: list[int] = field(default_factory=list)
    stuck: int | None = None
    memory: int = 0  # peak bytes of the search's own structures
    seconds: float = 0.0


_EMPTY_SET = sys.getsizeof(set())


class KeySearch:
    """The resumable search over one key's operations: `run(steps)` advances it by at most
    `steps` steps and returns True (linearizable), False (not), or None (not yet)."""

    def __init__(self, ops: Sequence[Op], reduce_observers: bool = True) -> None:
        self.ops = list(ops)
        n = self.n = len(self.ops)
        _check_append_values(self.ops)
        # Interned states: 0 is "no value". A key with appends holds strings only (checked
        # above), and is interned by the string itself, "" for no value.
        self.text = any(op.f == "append" for op in self.ops)
        self.values: list[Any] = ["" if self.text else None]
        self.ids: dict[Any, int] = {self.values[0] if self.text else _intern_key(None): 0}
        self.values_bytes = 0
        kind = [0] * n
        a = [0] * n
        b = [0] * n
        suffix: list[str] = [""] * n
        for i, op in enumerate(self.ops):
            if op.f == "read":
                kind[i], a[i] = READ, self._intern(_norm(op.output))
            elif op.f == "write":
                kind[i], a[i] = WRITE, self._intern(_norm(op.value))
            elif op.f == "append":
                kind[i], suffix[i] = APPEND, str(op.value)
            else:
                expected, new = op.value
                a[i], b[i] = self._intern(_norm(expected)), self._intern(_norm(new))
                kind[i] = CAS_ANY if op.output is None else CAS_OK if op.output else CAS_FAIL
            if not reduce_observers and kind[i] in (READ, CAS_FAIL):
                kind[i] = READ_PLAIN if kind[i] == READ else CAS_FAIL_PLAIN
        self.kind, self.a, self.b, self.suffix = kind, a, b, suffix
        # Entries 1..2n in time order; 0 is the list head. A completion sorts after every
        # invocation at its position; unknown completions sort after everything, in
        # invocation order.
        never = max((max(op.start, op.end or 0) for op in self.ops), default=0) + 1
        points = []
        for i, op in enumerate(self.ops):
            points.append((op.start, 0, i))
            points.append((never + i if op.end is None else op.end, 1, i))
        points.sort()
        size = 2 * n + 1
        self.nxt = nxt = [0] * size
        self.prv = prv = [0] * size
        self.is_call = is_call = [False] * size
        self.op_of = op_of = [0] * size
        self.ret_entry = ret_entry = [0] * n
        for e, (_pos, k, i) in enumerate(points, 1):
            is_call[e] = k == 0
            op_of[e] = i
            if k == 1:
                ret_entry[i] = e
            prv[e] = e - 1
            nxt[e - 1] = e
        nxt[size - 1] = -1
        # Search state. The set of linearized operations is `base` (every operation
        # invoked before the base-th is linearized) and `window` (a bitset of the ones
        # from the base on): the window holds only the operations still in play, so a
        # configuration costs memory for what is concurrent, not for the whole history.
        self.state = 0
        self.base = 0
        self.window = 0
        self.cache: set[int] = set()
        self.cache_digits = 0  # 30-bit digits of the integers in the cache
        # The stack of linearized calls, as linked frames (call entry, state before,
        # base before, window before, forced, the frame below): the linearization at
        # any moment is kept by holding its top frame.
        self.top: tuple | None = None
        self.depth = 0
        self.entry = 0  # where the scan resumes
        self.arriving = True  # at a configuration not scanned yet
        self.explored = 0
        self.steps = 0
        self.best = 0  # furthest completion entry reached
        self.best_top: tuple | None = None  # the linearization that reached it
        self.best_depth = 0
        self.result: bool | None = None if n else True
        self.peak_memory = 0
        self.seconds = 0.0

    def _intern(self, value: Any) -> int:
        key = ("" if value is None else value) if self.text else _intern_key(value)
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.values)
            self.values.append(value)
            self.values_bytes += sys.getsizeof(value) + 100  # dict slot and key tuple
        return found

    # -- accounting ---------------------------------------------------------------------
    def memory(self) -> int:
        """Bytes held by the search's growing structures: the configuration set (its
        table and its integers), the interned states, the stack (the linked list is
        fixed, the size of the history)."""
        if self.result is not None and not self.cache:
            return 0
        table = sys.getsizeof(self.cache)
        slots = max(8, (table - _EMPTY_SET) // 16)
        if len(self.cache) >= 0.54 * slots:
            # Within a tenth of the next resize, which holds the old table and a new one
            # twice (below 50,000 entries four times) its size at once: counted ahead.
            table += (2 if len(self.cache) > 50_000 else 4) * slots * 16
        return (
            table
            + 24 * len(self.cache)
            + 4 * self.cache_digits
            + sys.getsizeof(self.values)
            + sys.getsizeof(self.ids)
            + self.values_bytes
            + 100 * self.depth
        )

    def release(self) -> None:
        """Drop what only a running search needs (called once it has a verdict)."""
        self.peak_memory = max(self.peak_memory, self.memory())
        self.cache = set()
        self.cache_digits = 0
        self.ids = {}

    @staticmethod
    def _order(top: tuple | None) -> list[int]:
        entries = []
        while top is not None:
            entries.append(top[0])
            top = top[5]
        entries.reverse()
        return entries

    @property
    def best_order(self) -> list[int]:
        """The operations of the linearization that reached furthest, in order."""
        return [self.op_of[entry] for entry in self._order(self.best_top)]

    def frontier_op(self) -> int | None:
        """The operation whose completion is the furthest any linearization reached."""
        if self.best == 0 or self.best >= len(self.op_of):
            return None
        return self.op_of[self.best]

    # -- the search -------------------------------------------------------------------
    def run(self, steps: int, max_states: int | None = None) -> bool | None:
        """Advance by at most `steps` steps, stopping early once more than `max_states`
        configurations have been explored."""
        if self.result is not None:
            return self.result
        started = time.perf_counter()
        nxt, prv, is_call, op_of = self.nxt, self.prv, self.is_call, self.op_of
        ret_entry, kind, a, b = self.ret_entry, self.kind, self.a, self.b
        cache = self.cache
        values, suffix, ids_get = self.values, self.suffix, self.ids.get
        cache_add = cache.add
        n1 = self.n + 1
        state, base, window = self.state, self.base, self.window
        top, depth, e, arriving = self.top, self.depth, self.entry, self.arriving
        explored, best, digits = self.explored, self.best, self.cache_digits
        cap = (1 << 62) if max_states is None else max_states
        result: bool | None = None
        left = steps
        while left > 0:
            left -= 1
            fail = False
            forced = False
            take = 0  # the call entry to linearize next, if any
            if arriving:
                # A new configuration: a legal observer is taken at once (forced), and if
                # its configuration was explored already, this one fails too.
                arriving = False
                e = nxt[0]
                while e != -1 and is_call[e]:
                    i = op_of[e]
                    k = kind[i]
                    if (k == READ and state == a[i]) or (k == CAS_FAIL and state != a[i]):
                        new_state = state
                        new_window = window | (1 << (i - base))
                        new_base = base
                        if i == base:  # the window's low end is complete: move the base
                            t = (new_window ^ (new_window + 1)).bit_length() - 1
                            new_window >>= t
                            new_base += t
                        wl = new_window.bit_length()
                        config = (((state << wl) | new_window) * n1 + wl) * n1 + new_base
                        if config in cache:
                            fail = True
                        else:
                            take, forced = e, True
                        break
                    e = nxt[e]
                if not fail and not take:
                    if e == -1:
                        result = True
                        break
                    if e > best:
                        best, self.best_top, self.best_depth = e, top, depth
                    e = nxt[0]
            if not fail and not take and is_call[e]:
                i = op_of[e]
                k = kind[i]
                if k == WRITE:
                    new_state = a[i]
                elif k == CAS_OK:
                    if state != a[i]:
                        e = nxt[e]
                        continue
                    new_state = b[i]
                elif k == CAS_ANY:
                    new_state = b[i] if state == a[i] else state
                elif k == APPEND:
                    text = values[state] + suffix[i]
                    new_state = ids_get(text)
                    if new_state is None:
                        new_state = self._intern(text)
                elif (k == READ_PLAIN and state == a[i]) or (k == CAS_FAIL_PLAIN and state != a[i]):
                    new_state = state
                else:  # an observer, illegal here (the arrival scan took legal ones)
                    e = nxt[e]
                    continue
                new_window = window | (1 << (i - base))
                new_base = base
                if i == base:
                    t = (new_window ^ (new_window + 1)).bit_length() - 1
                    new_window >>= t
                    new_base += t
                wl = new_window.bit_length()
                config = (((new_state << wl) | new_window) * n1 + wl) * n1 + new_base
                if config in cache:
                    e = nxt[e]
                    continue
                take = e
            if take:
                # Linearize: lift the invocation and its completion out of the list.
                cache_add(config)
                digits += config.bit_length() // 30 + 1
                explored += 1
                if explored > cap:
                    left = 0
                top = (e, state, base, window, forced, top)
                depth += 1
                nxt[prv[e]] = nxt[e]
                prv[nxt[e]] = prv[e]
                r = ret_entry[i]
                nxt[prv[r]] = nxt[r]
                if nxt[r] != -1:
                    prv[nxt[r]] = prv[r]
                state, base, window = new_state, new_base, new_window
                arriving = True
                continue
            # Backtrack: a completion whose operation is not linearized (or a configuration
            # known to fail). A forced step's failure is its parent's failure.
            while True:
                if top is None:
                    result = False
                    break
                e, state, base, window, forced, top = top
                depth -= 1
                r = ret_entry[op_of[e]]
                nxt[prv[r]] = r
                if nxt[r] != -1:
                    prv[nxt[r]] = r
                nxt[prv[e]] = e
                prv[nxt[e]] = e
                if not forced:
                    break
            if result is not None:
                break
            e = nxt[e]
        self.state, self.base, self.window = state, base, window
        self.top, self.depth, self.entry, self.arriving = top, depth, e, arriving
        self.explored, self.best, self.cache_digits = explored, best, digits
        self.steps += steps - left
        self.seconds += time.perf_counter() - started
        if result is not None:
            self.result = result
        return result

    def outcome(self) -> Search:
        linearizable = bool(self.result)
        order = [self.op_of[entry] for entry in self._order(self.top)] if linearizable else []
        return Search(
            linearizable,
            self.explored,
            order,
            longest=[] if linearizable else list(self.best_order),
            stuck=None if linearizable else self.frontier_op(),
            memory=max(self.peak_memory, self.memory()),
            seconds=self.seconds,
        )


# -- budgets --------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc/self/statm), None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class KeyProgress:
    key: str | None
    operations: int
    status: str  # linearizable | not linearizable | searching | stopped
    states: int
    furthest: int  # operations placed in the furthest linearization found
    furthest_line: int | None  # the line of the completion it got to
    memory: int


@dataclass(slots=True)
class Progress:
    """How far a check got: per key, and in total."""

    keys: list[KeyProgress]
    seconds: float
    memory: int  # bytes held now: the larger of the searches' structures and the growth
    peak_memory: int  # the most `memory` has been
    structures: int = 0  # bytes the live searches' structures hold now (counted)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "memory_bytes": self.memory,
            "peak_memory_bytes": self.peak_memory,
            "search_structures_bytes": self.structures,
            "keys": [
                {
                    "key": k.key,
                    "operations": k.operations,
                    "status": k.status,
                    "states_explored": k.states,
                    "furthest_operations_placed": k.furthest,
                    "furthest_line": k.furthest_line,
                    "memory_bytes": k.memory,
                }
                for k in self.keys
            ],
        }

    def describe(self) -> str:
        decided = [k for k in self.keys if k.status in ("linearizable", "not linearizable")]
        lines = [
            f"{len(decided)} of {len(self.keys)} key(s) decided in {self.seconds:.1f} s, "
            f"peak memory {format_bytes(self.peak_memory)}"
        ]
        for k in self.keys:
            if k.status in ("searching", "stopped"):
                name = "(one register)" if k.key is None else repr(k.key)
                where = f", up to line {k.furthest_line}" if k.furthest_line else ""
                lines.append(
                    f"key {name}: {k.operations} operations, {k.states:,} configurations "
                    f"explored, furthest linearization placed {k.furthest}{where}, "
                    f"{format_bytes(k.memory)}"
                )
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """A size for people: KiB below a MiB, MiB below a GiB, GiB above."""
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def _key_progress(key: str | None, search: KeySearch, status: str) -> KeyProgress:
    stuck = search.frontier_op()
    line = search.ops[stuck].line if stuck is not None else None
    return KeyProgress(
        key,
        search.n,
        status,
        search.explored,
        search.best_depth,
        line,
        search.memory(),
    )


# -- whole histories ----------------------------------------------------------------


@dataclass(slots=True)
class KeyVerdict:
    key: str | None
    operations: int
    linearizable: bool | None  # None: not decided (another key failed first)
    states: int
    seconds: float
    memory: int = 0  # peak bytes of this key's search


@dataclass(slots=True)
class Verdict:
    model: str
    linearizable: bool
    keys: list[KeyVerdict]
    seconds: float
    failing_key: str | None = None
    # The failing key's events up to and including the completion of the operation that
    # no linearization can place (see the module's docstring).
    prefix: list[HistoryEvent] = field(default_factory=list)
    # The failing key's operations: the longest linearizable prefix in its order, and
    # the one that cannot be placed; for a linearizable history, each key's order.
    failing_operations: list[Op] = field(default_factory=list)
    longest: list[int] = field(default_factory=list)
    stuck: int | None = None
    orders: dict[str | None, list[int]] = field(default_factory=dict)
    operations_by_key: dict[str | None, list[Op]] = field(default_factory=dict)
    peak_memory: int = 0  # what the budget bounds (see `_Schedule.peak_memory`)
    search_memory: int = 0  # the searches' own structures at their peak (deterministic)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "linearizable": self.linearizable,
            "keys": len(self.keys),
            "keys_decided": sum(k.linearizable is not None for k in self.keys),
            "operations": sum(k.operations for k in self.keys),
            "states_explored": sum(k.states for k in self.keys),
            "search_memory_bytes": self.search_memory,
            "seconds": round(self.seconds, 6),
            "failing_key": self.failing_key,
            "failing_prefix_events": len(self.prefix),
            "failing_prefix": [e.to_edn() for e in self.prefix],
        }
        if not self.linearizable and self.stuck is not None:
            ops = self.failing_operations
            out["longest_linearizable_prefix"] = [_op_text(ops[i]) for i in self.longest]
            out["cannot_place"] = _op_text(ops[self.stuck])
        return out


def _op_text(op: Op) -> dict[str, Any]:
    return {
        "process": op.process,
        "f": op.f,
        "value": list(op.value) if isinstance(op.value, tuple) else op.value,
        "output": op.output,
        "line": op.line,
        "completion_line": op.end_line,
    }


def check_operations(
    ops: Sequence[Op],
    model: str,
    max_states: int | None = None,
    *,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    time_limit: float | None = None,
) -> Search:
    """Decide one key's operations under `model` (budgets as for `check_history`)."""
    _check_model(ops, model)
    return search(ops, max_states, max_memory=max_memory, time_limit=time_limit)


def _check_model(ops: Sequence[Op], model: str) -> None:
    allowed = MODELS[model]
    for op in ops:
        if op.f not in allowed:
            raise HistoryError(
                f"{_where(op)}: model {model!r} has no :{op.f} operation (process {op.process})"
            )


def search(
    ops: Sequence[Op],
    max_states: int | None = None,
    *,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    time_limit: float | None = None,
    reduce_observers: bool = True,
) -> Search:
    """Decide one key's history. `ops` carry start/end positions in one time order."""
    key = KeySearch(ops, reduce_observers)
    runner = _Schedule({None: key}, max_states, max_memory, time_limit, None)
    runner.run()
    return runner.searches[None].outcome()


@dataclass(slots=True)
class _Schedule:
    """Runs the keys' searches interleaved until one fails or all succeed, within the
    budgets."""

    searches: dict[str | None, KeySearch]
    max_states: int | None
    max_memory: int | None
    time_limit: float | None
    on_progress: Callable[[Progress], None] | None
    progress_every: float = 1.0
    status: dict[str | None, str] = field(default_factory=dict)
    peak_structures: int = 0  # the searches' own structures, counted (deterministic)
    peak_growth: int = 0  # the process's resident memory above what it was at the start
    started: float = field(default_factory=time.perf_counter)
    resident_at_start: int | None = field(default_factory=resident_bytes)
    growth: int = 0
    growth_read_at: float = 0.0
    failing: str | None = None
    failed: bool = False

    def __post_init__(self) -> None:
        self.status = {key: "searching" for key in self.searches}

    @property
    def peak_memory(self) -> int:
        """What the budget bounds: the larger of the two measures."""
        return max(self.peak_structures, self.peak_growth)

    def read_growth(self, now: float) -> int:
        """The process's resident growth, read at most every 50 ms (it is a file read)."""
        if self.resident_at_start is not None and now - self.growth_read_at >= 0.05:
            self.growth_read_at = now
            resident = resident_bytes()
            if resident is not None:
                self.growth = max(0, resident - self.resident_at_start)
                self.peak_growth = max(self.peak_growth, self.growth)
        return self.growth

    def progress(self) -> Progress:
        keys = [_key_progress(k, s, self.status[k]) for k, s in self.searches.items()]
        live = sum(s.memory() for s in self.searches.values() if s.result is None)
        self.peak_structures = max(self.peak_structures, live)
        memory = max(live, self.read_growth(time.perf_counter()))
        return Progress(keys, time.perf_counter() - self.started, memory, self.peak_memory, live)

    def run(self) -> None:
        live = [key for key, s in self.searches.items() if s.result is None]
        for key, s in self.searches.items():
            if s.result is not None:
                self.status[key] = "linearizable"
        held = dict.fromkeys(live, 0)  # bytes each live search held after its last slice
        total = 0
        next_report = self.started + self.progress_every
        while live:
            for key in list(live):
                s = self.searches[key]
                result = s.run(SLICE, self.max_states)
                used = s.memory()
                total += used - held[key]
                held[key] = used
                self.peak_structures = max(self.peak_structures, total)
                now = time.perf_counter()
                memory = max(total, self.read_growth(now))
                if result is None:
                    if self.max_states is not None and s.explored > self.max_states:
                        self._give_up(
                            SearchBudgetExceeded,
                            f"more than {self.max_states} configurations of key "
                            f"{_name(key)} explored",
                        )
                else:
                    live.remove(key)
                    total -= held.pop(key)
                    s.release()
                    if not result:
                        self.status[key] = "not linearizable"
                        self.failing, self.failed = key, True
                        for other in live:
                            self.status[other] = "stopped"
                            self.searches[other].release()
                        return
                    self.status[key] = "linearizable"
                if self.max_memory is not None and memory > self.max_memory:
                    self._give_up(
                        MemoryBudgetExceeded,
                        f"the memory budget of {format_bytes(self.max_memory)} was reached",
                    )
                if self.time_limit is not None and now - self.started > self.time_limit:
                    self._give_up(
                        TimeBudgetExceeded,
                        f"the time limit of {self.time_limit:g} s was reached",
                    )
                if self.on_progress is not None and now >= next_report:
                    next_report = now + self.progress_every
                    self.on_progress(self.progress())

    def _give_up(self, kind: type[SearchBudgetExceeded], reason: str) -> None:
        progress = self.progress()
        for s in self.searches.values():
            s.release()
        raise kind(f"{reason}: {progress.describe()}", progress, reason)


def _name(key: str | None) -> str:
    return "(one register)" if key is None else repr(key)


def check_history(
    history: History | Sequence[HistoryEvent],
    model: str = "kv",
    *,
    shortest_prefix: bool = True,
    max_states: int | None = None,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    time_limit: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    reduce_observers: bool = True,
) -> Verdict:
    """Check a whole history, its keys interleaved; on failure, the failing key's prefix
    up to the completion that cannot be placed.

    Budgets: `max_states` configurations of any one key, `max_memory` bytes held by the
    searches at once (None: no bound), `time_limit` seconds; past any of them
    `SearchBudgetExceeded` (with `.progress`) is raised. `on_progress` gets a `Progress`
    about once a second while the check runs. `reduce_observers=False` searches as
    Porcupine does, without the observer reduction (same verdicts, more configurations:
    the benchmark's reference)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    events = list(history)
    started = time.perf_counter()
    by_key: dict[str | None, list[Op]] = defaultdict(list)
    for op in pair_operations(events):
        by_key[op.key].append(op)
    keys = sorted(by_key, key=lambda k: (k is not None, str(k)))
    for key in keys:
        _check_model(by_key[key], model)
    searches = {key: KeySearch(by_key[key], reduce_observers) for key in keys}
    schedule = _Schedule(searches, max_states, max_memory, time_limit, on_progress)
    schedule.run()
    verdicts = []
    for key in keys:
        s = searches[key]
        verdicts.append(
            KeyVerdict(
                key,
                s.n,
                s.result,
                s.explored,
                s.seconds,
                max(s.peak_memory, s.memory()),
            )
        )
    verdict = Verdict(
        model,
        not schedule.failed,
        verdicts,
        0.0,
        operations_by_key=dict(by_key),
        peak_memory=schedule.peak_memory,
        search_memory=schedule.peak_structures,
    )
    if schedule.failed:
        key = schedule.failing
        outcome = searches[key].outcome()
        verdict.failing_key = key
        verdict.failing_operations = by_key[key]
        verdict.longest = outcome.longest
        verdict.stuck = outcome.stuck
        if shortest_prefix and outcome.stuck is not None:
            end = by_key[key][outcome.stuck].end
            verdict.prefix = [e for p, e in enumerate(events) if p <= end and e.key == key]
    else:
        verdict.orders = {key: searches[key].outcome().order for key in keys}
    verdict.seconds = time.perf_counter() - started
    return verdict


def shortest_failing_prefix(
    events: Sequence[HistoryEvent], model: str, max_states: int | None = None
) -> list[HistoryEvent]:
    """The events up to the completion that no linearization gets past (one search)."""
    verdict = check_history(events, model, max_states=max_states)
    return verdict.prefix


__all__ = [
    "DEFAULT_MAX_MEMORY",
    "MODELS",
    "KeyProgress",
    "KeySearch",
    "KeyVerdict",
    "MemoryBudgetExceeded",
    "Progress",
    "Search",
    "SearchBudgetExceeded",
    "TimeBudgetExceeded",
    "Verdict",
    "check_history",
    "format_bytes",
    "check_operations",
    "search",
    "shortest_failing_prefix",
    "step",
]
