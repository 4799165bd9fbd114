"""Client histories: what simulated clients did and saw, in Jepsen's terms, and the two
file forms they are read from and written to.

A history is a list of `HistoryEvent`s in real-time order: each operation is an
`invoke` by a client process followed by its completion, `ok` (it happened, with this
result), `fail` (it certainly did not take effect) or `info` (unknown: it may take effect
at any time after its invocation, or never). As in Jepsen, a process whose operation
timed out is not reused: the client continues under a fresh process number.

Forms read and written:
- Jepsen's EDN log, one map a line: `{:process 0, :type :invoke, :f :cas, :key "k",
  :value [1 2]}` (`to_edn`, `parse_edn`);
- the jepsen-etcd `INFO jepsen.util - P<TAB>:TYPE<TAB>:F<TAB>VALUE` log (`parse_etcd_log`).
For `cas`, `fail` without an `:error` means "the value was not FROM" (a completed
compare that constrains the register), as in Jepsen's etcd test; a `fail` with an
`:error` (a redirect, an unavailable leader) means the operation was never applied.

`SimClient` drives operations against a cluster in the kernel with timeouts and records
them here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import edn_format
from edn_format import ImmutableList, Keyword

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

_ETCD_LINE = re.compile(
    r"^INFO\s+jepsen\.util\s+-\s+(\d+)\t:(invoke|ok|fail|info)\t:(\w[\w-]*)\t(.*?)\s*$"
)


def _value(text: str, line: int) -> Any:
    """An EDN value: the common cases by hand (fast), the rest by edn_format."""
    text = text.strip()
    if text == "nil":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        value = edn_format.loads(text)
    except Exception as err:  # edn_format raises its own and ply's errors
        raise HistoryError(f"line {line}: unreadable value {text!r}: {err}") from None
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Keyword):
        return value.name
    if isinstance(value, list | tuple | ImmutableList):
        return tuple(_plain(v) for v in value)
    return value


def parse_etcd_log(text: str) -> History:
    """The jepsen-etcd log form; lines that are not operations are ignored."""
    history = History()
    for number, raw in enumerate(text.splitlines(), 1):
        m = _ETCD_LINE.match(raw)
        if not m:
            continue
        process, kind, f, value_text = m.groups()
        if f not in F_ALIASES:
            raise HistoryError(f"line {number}: unknown operation :{f}")
        value = _value(value_text, number)
        error = None
        if value == "timed-out":
            value, error = None, "timed-out"
        history.append(
            HistoryEvent(
                int(process), EventType(kind), F_ALIASES[f], value, error=error, line=number
            )
        )
    if not history.events:
        raise HistoryError("no operations found (not a jepsen-etcd log?)")
    return history


def parse_edn(text: str) -> History:
    """Jepsen's EDN history, one map a line (blank lines and `;` comments ignored)."""
    history = History()
    for number, raw in enumerate(text.splitlines(), 1):
        raw = raw.strip()
        if not raw or raw.startswith(";"):
            continue
        try:
            fields = edn_format.loads(raw)
        except Exception as err:
            raise HistoryError(f"line {number}: not an EDN map: {err}") from None
        if not isinstance(fields, Mapping):
            raise HistoryError(f"line {number}: not an EDN map: {raw[:80]!r}")
        get = {k.name if isinstance(k, Keyword) else str(k): v for k, v in fields.items()}
        try:
            process = get["process"]
            kind = EventType(_plain(get["type"]))
            f = F_ALIASES[_plain(get["f"])]
        except (KeyError, ValueError) as err:
            raise HistoryError(f"line {number}: missing or unknown field {err}") from None
        if not isinstance(process, int):
            raise HistoryError(f"line {number}: :process must be an integer, got {process!r}")
        time = get.get("time")
        error = get.get("error")
        history.append(
            HistoryEvent(
                process,
                kind,
                f,
                _plain(get.get("value")),
                key=None if get.get("key") is None else str(get["key"]),
                time=None if time is None else time / 1e9,
                error=None if error is None else str(_plain(error)),
                line=number,
            )
        )
    if not history.events:
        raise HistoryError("no operations found (empty EDN history)")
    return history


def read_history(path: Path) -> History:
    """Read either form, chosen by the content (an EDN history starts with `{`)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise HistoryError(f"cannot read {path}: {err}") from None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("{"):
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
        value = _argument(invoke, event)
        if event.type is EventType.OK:
            output = event.value if invoke.f == "read" else True
            ops.append(
                Op(
                    event.process,
                    invoke.f,
                    invoke.key,
                    value,
                    output,
                    start,
                    position,
                    EventType.OK,
                )
            )
        elif event.type is EventType.FAIL:
            if invoke.f == "cas" and event.error is None:
                ops.append(
                    Op(
                        event.process,
                        "cas",
                        invoke.key,
                        value,
                        False,
                        start,
                        position,
                        EventType.FAIL,
                    )
                )
            elif invoke.f == "read" and event.error == "timed-out":
                continue  # an unanswered read constrains nothing
            # any other fail: the operation was not applied
        else:
            if invoke.f != "read":
                ops.append(
                    Op(
                        event.process,
                        invoke.f,
                        invoke.key,
                        value,
                        None,
                        start,
                        None,
                        EventType.INFO,
                    )
                )
    for start, invoke in open_ops.values():
        if invoke.f != "read":
            ops.append(
                Op(
                    invoke.process,
                    invoke.f,
                    invoke.key,
                    invoke.value,
                    None,
                    start,
                    None,
                    EventType.INFO,
                )
            )
    ops.sort(key=lambda op: op.start)
    return ops


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
