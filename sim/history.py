"""Client histories: what simulated clients did and saw, in Jepsen's terms, and the file
forms they are read from and written to.

A history is a list of `HistoryEvent`s in real-time order: each operation is an
`invoke` by a client process followed by its completion, `ok` (it happened, with this
result), `fail` (it certainly did not take effect) or `info` (unknown: it may take effect
at any time after its invocation, or never). As in Jepsen, a process whose operation
timed out is not reused: the client continues under a fresh process number.

Forms read and written (`read_history` chooses by the content; docs/checker.md):
- Jepsen's EDN history, one map a line, maybe inside a vector: `{:process 0, :type
  :invoke, :f :cas, :key "k", :value [1 2]}` (`to_edn`, `parse_edn`); Porcupine's kv
  logs are this form with `:get`/`:put`/`:append`; `:nemesis` operations are skipped;
- the jepsen-etcd log, `INFO jepsen.util - P :TYPE :F VALUE` with its columns separated
  by any whitespace (`parse_etcd_log`).
Anything else is refused with a `HistoryError` naming the line.
For `cas`, `fail` without an `:error` means "the value was not FROM" (a completed
compare that constrains the register), as in Jepsen's etcd test; a `fail` with an
`:error` (a redirect, an unavailable leader) means the operation was never applied.

`SimClient` drives operations against a cluster in the kernel with timeouts and records
them here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import edn_format
from edn_format import Keyword
from twlb.sim import edn

from twlb.protocol import ClientReply, ClientRequest, Operation, OpKind


class HistoryError(ValueError):
    """A history file or event that cannot be read; the message names the line."""


class EventType(StrEnum):
    INVOKE = "invoke"
    OK = "ok"
    FAIL = "fail"
    INFO = "info"


#: Operation names each form uses, mapped to the checker's: read/write/cas/append.
F_ALIASES = {
    "read": "read",
    "get": "read",
    "write": "write",
    "put": "write",
    "cas": "cas",
    "append": "append",
}


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    process: int
    type: EventType
    f: str  # read | write | cas | append (aliases get/put accepted on input)
    value: Any = None  # cas: (expected, new)
    key: str | None = None
    time: float | None = None  # virtual time in seconds, when the simulator recorded it
    error: str | None = None
    line: int | None = None  # 1-based line in the file it was read from

    def to_edn(self) -> str:
        fields: dict[Keyword, Any] = {
            Keyword("process"): self.process,
            Keyword("type"): Keyword(self.type.value),
            Keyword("f"): Keyword(self.f),
        }
        if self.key is not None:
            fields[Keyword("key")] = self.key
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        fields[Keyword("value")] = value
        if self.time is not None:
            fields[Keyword("time")] = int(round(self.time * 1e9))  # Jepsen: nanoseconds
        if self.error is not None:
            fields[Keyword("error")] = Keyword(self.error)
        text = edn_format.dumps(fields)
        # edn_format separates entries by spaces only; Jepsen's logs use ", ".
        return _edn_commas(text)


def _edn_commas(text: str) -> str:
    out, depth, in_string, tokens = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            in_string = not in_string
        if not in_string:
            if ch in "[{(":
                depth += 1
            elif ch in "]})":
                depth -= 1
            elif ch == " " and depth == 1:
                tokens += 1
                if tokens % 2 == 0:
                    out.append(",")
        out.append(ch)
    return "".join(out)


class History:
    """An ordered list of events, with the operations they pair into."""

    def __init__(self, events: Iterable[HistoryEvent] = ()) -> None:
        self.events: list[HistoryEvent] = list(events)

    def append(self, event: HistoryEvent) -> None:
        self.events.append(event)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[HistoryEvent]:
        return iter(self.events)

    def to_edn(self) -> str:
        return "".join(event.to_edn() + "\n" for event in self.events)

    def write_edn(self, path: Path) -> None:
        path.write_text(self.to_edn())

    def counts(self) -> dict[str, int]:
        counts = {t.value: 0 for t in EventType}
        for event in self.events:
            counts[event.type.value] += 1
        return counts


# -- reading ------------------------------------------------------------------------

#: A jepsen-etcd log line: Jepsen's `jepsen.util` logger printing one operation, its
#: columns separated by tabs or by runs of spaces, after whatever prefix the log layout
#: puts first (a level, a timestamp, a thread).
_ETCD_LINE = re.compile(
    r"jepsen\.util\s*[-:]?\s+(?P<process>\S+)\s+:(?P<type>[\w-]+)\s+:(?P<f>[\w-]+)(?P<rest>.*)$"
)


def _event(
    number: int, process: Any, kind: Any, f: Any, value: Any, **extra: Any
) -> HistoryEvent | None:
    """One event from a parsed line; None for a line of a process that is not a client
    (Jepsen's `:nemesis`, which the checker ignores)."""
    if isinstance(process, edn.Kw):
        return None  # :nemesis and other named processes are not clients
    if not isinstance(process, int) or isinstance(process, bool):
        raise HistoryError(
            f"line {number}: :process must be an integer or a keyword, got {process!r}"
        )
    try:
        event_type = EventType(kind)
    except ValueError:
        raise HistoryError(
            f"line {number}: unknown :type {kind!r} (expected invoke, ok, fail or info)"
        ) from None
    if f not in F_ALIASES:
        raise HistoryError(
            f"line {number}: unknown operation :{f} (the checker knows "
            f"{', '.join(sorted(F_ALIASES))})"
        )
    return HistoryEvent(process, event_type, F_ALIASES[f], value, line=number, **extra)


def parse_etcd_log(text: str) -> History:
    """The jepsen-etcd log form: `INFO jepsen.util - P :TYPE :F VALUE`, columns separated
    by any whitespace; lines of other loggers are ignored, a `jepsen.util` operation line
    that cannot be read is an error naming its line."""
    history = History()
    for number, raw in enumerate(text.splitlines(), 1):
        m = _ETCD_LINE.search(raw)
        if not m:
            continue
        rest = m.group("rest").strip()
        try:
            value, tail = edn.read_prefix(rest) if rest else (None, "")
        except edn.EdnError as err:
            raise HistoryError(f"line {number}: unreadable value {rest!r}: {err}") from None
        error = None
        tail = tail.strip()
        if tail:  # newer Jepsen logs print the error in a fifth column
            error = tail.lstrip(":")
        if value == "timed-out" and error is None:
            value, error = None, "timed-out"
        process = m.group("process")
        if process.startswith(":"):
            process = edn.Kw(process[1:])
        elif re.fullmatch(r"-?\d+", process):
            process = int(process)
        event = _event(number, process, m.group("type"), m.group("f"), value, error=error)
        if event is not None:
            history.append(event)
    if not history.events:
        raise HistoryError(_not_a_history(text))
    return history


def _not_a_history(text: str) -> str:
    first = next(
        ((n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()),
        None,
    )
    if first is None:
        return "the file is empty: no operations found"
    number, line = first
    return (
        f"no operations found: line {number} ({line[:60]!r}) is not a Jepsen EDN map, "
        f"a Porcupine kv line or a jepsen-etcd log line (INFO jepsen.util - P :type :f value)"
    )


def parse_edn(text: str) -> History:
    """Jepsen's EDN history and Porcupine's kv logs: one operation map a line (blank lines
    and `;` comments ignored), optionally inside a vector (`[` first, `]` last, as
    Knossos's files are). Operations of non-client processes (`:nemesis`) are skipped."""
    history = History()
    lines = text.splitlines()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if not history.events and line.startswith("["):
            line = line[1:].strip()
        if line.endswith("]") and _is_last(lines, number):
            line = line[:-1].strip()
        if not line:
            continue
        try:
            fields = edn.read(line)
        except edn.EdnError as err:
            raise HistoryError(
                f"line {number}: not an EDN map (one operation a line): {err}"
            ) from None
        if not isinstance(fields, dict):
            raise HistoryError(
                f"line {number}: not an EDN map (one operation a line): {line[:80]!r}"
            )
        missing = [k for k in ("process", "type", "f") if k not in fields]
        if missing:
            raise HistoryError(
                f"line {number}: the map has no {', '.join(':' + k for k in missing)}"
            )
        time = fields.get("time")
        if time is not None and not isinstance(time, int | float):
            raise HistoryError(f"line {number}: :time must be a number, got {time!r}")
        error = fields.get("error")
        key = fields.get("key")
        event = _event(
            number,
            fields["process"],
            fields["type"],
            fields["f"],
            fields.get("value"),
            key=None if key is None else str(key),
            time=None if time is None else time / 1e9,
            error=None if error is None else str(error),
        )
        if event is not None:
            history.append(event)
    if not history.events:
        raise HistoryError("no operations found (empty EDN history)")
    return history


def _is_last(lines: list[str], number: int) -> bool:
    return all(not line.strip() or line.strip().startswith(";") for line in lines[number:])


def read_history(path: Path) -> History:
    """Read any of the forms, chosen by the content: an EDN history (or Porcupine kv log)
    starts with `{` or `[`; anything else is read as a jepsen-etcd log."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise HistoryError(f"cannot read {path}: {err}") from None
    return parse_history(text)


def parse_history(text: str) -> History:
    """`read_history` on text."""
    first = next(
        (
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith(";")
        ),
        "",
    )
    if first.startswith(("{", "[")):
        return parse_edn(text)
    return parse_etcd_log(text)


# -- operations ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One operation paired from its events; `end` is None when its outcome is unknown."""

    process: int
    f: str
    key: str | None
    value: Any  # the argument: write value, (expected, new), append suffix
    output: Any  # read: value read; cas: True/False; None when unknown
    start: int  # position of the invocation in the history
    end: int | None  # position of the completion; None: unknown outcome
    outcome: EventType  # ok, fail or info
    line: int | None = None  # the invocation's line in the file it was read from
    end_line: int | None = None  # the completion's line


def pair_operations(events: Sequence[HistoryEvent]) -> list[Op]:
    """Pair invocations with completions by process. Operations that certainly did not
    happen (a fail with an error) are dropped; invocations never completed are `info`."""
    open_ops: dict[int, tuple[int, HistoryEvent]] = {}
    ops: list[Op] = []
    for position, event in enumerate(events):
        where = f"line {event.line}" if event.line else f"event {position + 1}"
        if event.type is EventType.INVOKE:
            if event.process in open_ops:
                raise HistoryError(
                    f"{where}: process {event.process} invoked again before completing"
                )
            open_ops[event.process] = (position, event)
            continue
        if event.process not in open_ops:
            raise HistoryError(
                f"{where}: process {event.process} completed an operation it never invoked"
            )
        start, invoke = open_ops.pop(event.process)
        if invoke.f != event.f:
            raise HistoryError(
                f"{where}: process {event.process} invoked :{invoke.f} but completed :{event.f}"
            )
        if invoke.key != event.key:
            raise HistoryError(
                f"{where}: process {event.process} invoked on key {invoke.key!r} but "
                f"completed on key {event.key!r}"
            )
        value = _argument(invoke, event)
        if event.type is EventType.OK:
            output = event.value if invoke.f == "read" else True
        elif event.type is EventType.FAIL:
            if invoke.f == "cas" and event.error is None:
                output = False  # completed: the value was not FROM
            else:
                continue  # not applied (or an unanswered read): constrains nothing
        elif invoke.f == "read":
            continue  # a read with an unknown outcome constrains nothing
        else:
            ops.append(_unknown(invoke, value, start))
            continue
        ops.append(
            Op(
                event.process,
                invoke.f,
                invoke.key,
                value,
                output,
                start,
                position,
                event.type,
                invoke.line,
                event.line,
            )
        )
    for start, invoke in open_ops.values():
        if invoke.f != "read":
            ops.append(_unknown(invoke, _argument(invoke, invoke), start))
    ops.sort(key=lambda op: op.start)
    return ops


def _unknown(invoke: HistoryEvent, value: Any, start: int) -> Op:
    return Op(
        invoke.process,
        invoke.f,
        invoke.key,
        value,
        None,
        start,
        None,
        EventType.INFO,
        invoke.line,
    )


def _argument(invoke: HistoryEvent, completion: HistoryEvent) -> Any:
    value = invoke.value
    if invoke.f == "cas":
        if not (isinstance(value, tuple) and len(value) == 2):
            where = f"line {invoke.line}" if invoke.line else "an event"
            raise HistoryError(f"{where}: :cas needs [FROM TO], got {value!r}")
        return value
    if invoke.f in ("write", "append") and value is None:
        return completion.value
    return value


__all__ = [
    "EventType",
    "HistoryEvent",
    "History",
    "HistoryError",
    "Op",
    "parse_edn",
    "parse_etcd_log",
    "parse_history",
    "read_history",
    "pair_operations",
]


# -- simulated clients ----------------------------------------------------------------


class ProcessNumbers:
    """Jepsen's process numbers: a client gets a fresh one after a timed-out operation."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> int:
        number = self._next
        self._next += 1
        return number


@dataclass(frozen=True, slots=True)
class Workload:
    """What simulated clients ask for: operations on a few keys with small values."""

    keys: tuple[str, ...] = ("k0", "k1", "k2")
    read_fraction: float = 0.4
    cas_fraction: float = 0.2
    timeout: float = 1.0  # seconds of virtual time before the outcome is unknown
    think: float = 0.01  # pause between one operation's end and the next
    max_ops: int = 10_000  # per client: work is bounded whatever the cluster does


class SimClient:
    """One closed-loop client: one operation at a time, to the node it believes leads.

    It records every invocation and completion in the shared `History`: `ok` with the
    result, `fail` for a compare-and-set whose expected value did not match, `fail` with
    an `:error` when a node refused the operation (a redirect: it was not applied), and
    `info` when no answer came within the timeout (then it continues as a new process).
    """

    def __init__(
        self,
        kernel: Any,
        name: str,
        nodes: Sequence[str],
        history: History,
        processes: ProcessNumbers,
        workload: Workload,
        stop_at: float,
        reply_quorum: Any = None,
    ) -> None:
        # reply_quorum: for Byzantine protocols, a factory of collectors whose
        # add(reply, node) returns the reply once enough replicas agree on it (PBFT: f+1);
        # the client then sends every request to every replica.
        self.reply_quorum = reply_quorum
        self.collector: Any = None
        self.kernel = kernel
        self.name = name
        self.nodes = list(nodes)
        self.history = history
        self.processes = processes
        self.workload = workload
        self.stop_at = stop_at
        self.process = processes.take()
        self.number = self.process + 1
        self.seen: dict[str, Any] = {}  # key -> last value read or written here
        self.seq = 0
        self.pending: tuple[int, Any, float] | None = None  # (seq, operation, invoked at)
        self.leader_hint: str | None = None
        self.latencies: list[tuple[float, float, str]] = []  # (completed at, latency, f)
        self.outcomes = {"ok": 0, "fail": 0, "info": 0}
        kernel.register_client(name, self.on_reply)

    def start(self, at: float) -> None:
        self.kernel.call_at(at, self._issue)

    def _choose(self) -> tuple[str, Any, Any]:
        rng = self.kernel.rng
        w = self.workload
        key = rng.choice(w.keys)
        roll = rng.random()
        if roll < w.read_fraction:
            return "read", None, Operation(OpKind.GET, key)
        # Every written value is unique (Jepsen's practice): a read then names the one
        # write it saw, which keeps the checker's search narrow under concurrency.
        value = self.number * 1_000_000 + self.seq + 1
        if roll < w.read_fraction + w.cas_fraction:
            # Expect the last value this client saw for the key, so that a good share of
            # compare-and-sets succeed.
            expected = self.seen.get(key)
            return "cas", (expected, value), Operation(OpKind.CAS, key, (expected, value))
        return "write", value, Operation(OpKind.PUT, key, value)

    def _issue(self) -> None:
        now = self.kernel.now
        if now >= self.stop_at or self.seq >= self.workload.max_ops:
            return
        f, value, operation = self._choose()
        self.seq += 1
        self.pending = (self.seq, operation, now)
        self.history.append(
            HistoryEvent(self.process, EventType.INVOKE, f, value, key=operation.key, time=now)
        )
        request = ClientRequest(self.name, self.seq, operation)
        if self.reply_quorum is not None:
            self.collector = self.reply_quorum()
            for node in self.nodes:
                self.kernel.send_request(self.name, node, request)
        else:
            target = self.leader_hint or self.kernel.rng.choice(self.nodes)
            self.kernel.send_request(self.name, target, request)
        self.kernel.call_after(self.workload.timeout, self._on_timeout, self.seq)

    def _complete(self, kind: EventType, value: Any, error: str | None = None) -> None:
        seq, operation, invoked = self.pending
        f, invoked_value = self._f_of(operation)
        now = self.kernel.now
        self.history.append(
            HistoryEvent(
                self.process,
                kind,
                f,
                invoked_value if f != "read" else value,
                key=operation.key,
                time=now,
                error=error,
            )
        )
        self.pending = None
        self.outcomes[kind.value] += 1
        if kind is EventType.OK:
            self.latencies.append((now, now - invoked, f))
            if f == "read":
                self.seen[operation.key] = value
            elif f == "write":
                self.seen[operation.key] = invoked_value
            else:
                self.seen[operation.key] = invoked_value[1]
        if kind is EventType.INFO:
            self.process = self.processes.take()
        self.kernel.call_after(self.workload.think, self._issue)

    @staticmethod
    def _f_of(operation: Operation) -> tuple[str, Any]:
        if operation.kind is OpKind.GET:
            return "read", None
        if operation.kind is OpKind.PUT:
            return "write", operation.value
        return "cas", tuple(operation.value)

    def on_reply(self, reply: ClientReply, node: str, now: float) -> None:
        if self.pending is None or reply.seq != self.pending[0]:
            return  # a late or duplicated answer to an operation already settled
        if self.collector is not None:
            agreed = self.collector.add(reply, node)
            if agreed is None:
                return  # not yet vouched for by enough replicas
            reply = agreed
        if reply.leader_hint is not None:
            self.leader_hint = reply.leader_hint
        if reply.ok:
            self._complete(EventType.OK, reply.value)
            return
        is_cas = self.pending[1].kind is OpKind.CAS
        if reply.error is None and is_cas:
            self._complete(EventType.FAIL, None)  # the expected value did not match
        else:
            if reply.leader_hint is None:
                self.leader_hint = None
            self._complete(EventType.FAIL, None, error=reply.error or "refused")

    def _on_timeout(self, seq: int) -> None:
        if self.pending is not None and self.pending[0] == seq:
            self.leader_hint = None  # whoever we asked may be gone: ask someone else
            self._complete(EventType.INFO, None, error="timeout")
