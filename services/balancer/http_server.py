"""The balancer's HTTP/1.1 server: httptools parsing, keep-alive, in-order answers, and
the limits that keep one client from stalling or exhausting the balancer.

`HttpServer(handler, limits, budget)` serves any `Handler`: each complete request within
the limits is handed to `handler.handle(...)` and its `Reply` goes out in one transport
write. Chosen by measurement over uvicorn for the proxy path (no ASGI scope, no Request
objects, no routing). What one client can take is bounded (docs/manual.md, docs/DESIGN.md):

- work: a connection's requests are answered one at a time, in order, one per turn of
  the event loop when they were pipelined; at most `max_pipelined` are read ahead; its
  input is handed to the parser `PARSE_SLICE` bytes at a time, and once it has taken
  `TURN_S` of a turn of the loop the rest waits for the next turn (a write of a thousand
  pipelined requests, or a body sent in 2-byte chunks, is parsed a little per turn);
- memory: request bodies are held as one buffer and charged to the process's memory
  budget as they arrive (`memory.MemoryBudget`), so are answers a client leaves unread in
  its write buffer; a charge over the budget is refused with 503; a client that does not
  read stops being served (write back-pressure) and is dropped after `send_timeout_s`;
- time: a head must be complete `head_timeout_s` after its first byte and a body
  `body_timeout_s` after its head (408, then the connection closes);
- connections: past `max_connections` a new connection takes the place of the one that
  has waited longest for its client (an idle keep-alive connection, a slow head or body);
  only when every connection is being answered does it get 503; a connection carries
  `keepalive_requests` answers, the last of which closes it (so clients reconnect, and
  their connections spread again over replicas accepting from one socket).

A refused request (400, 405, 408, 413, 431, 503, 505) is answered and its connection
closed, never drained: after the answer the connection lingers `LINGER_S`, reading and
dropping what the client still sends so the answer is not lost to a reset.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from http import HTTPStatus
from ssl import SSLContext
from time import perf_counter
from typing import Any, Protocol

import httptools
import orjson
from twlb.balancer.memory import MemoryBudget, PageReturner, known_small

log = logging.getLogger("twlb.balancer")

_JSON_HEADERS = [(b"content-type", b"application/json")]


def _error_body(message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": message, **extra})


@dataclass(slots=True)
class Reply:
    """A complete answer to a client: status, every header to send, and the body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def json_reply(status_code: int, message: str, **extra: Any) -> Reply:
    """An error answer in the balancer's JSON shape `{"error": message, ...}`."""
    body = _error_body(message, **extra)
    return Reply(
        status_code,
        [*_JSON_HEADERS, (b"content-length", str(len(body)).encode("ascii"))],
        body,
    )


#: Status lines by code (HTTP/1.1 and the standard reason phrase).
_STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus
}

#: Seconds in-flight requests get to finish after SIGTERM (the balancer's `--drain-s`
#: sets its own); each one still unfinished then, and each one read but not started, is
#: answered 503.
SHUTDOWN_GRACE_S = 10.0

#: While draining, a connection idle this long (its client sends nothing on it) is
#: closed; one in use is closed by the answer to its next request instead, which never
#: races a request the client is sending.
DRAIN_IDLE_S = 1.0

#: Bytes of input handed to the parser at once.
PARSE_SLICE = 4 * 1024

#: Loop time one connection's input may take in one turn of the event loop (checked
#: between slices); the rest of what it sent is parsed in a later turn, after the other
#: connections have had theirs.
TURN_S = 0.0002

#: Looks at connections' deadlines per second (each looks at a share of the connections).
SWEEPS = 10

#: A body without a length is charged to the memory budget in steps (its size doubled,
#: at least this much), not at each chunk.
BODY_STEP = 4 * 1024

#: Answer bodies larger than this are written as a buffer of their own (not copied into
#: one buffer with the head).
WRITTEN_APART_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client connection may send or hold before it is refused.

    The values come from `BalancerSettings.server_limits` (services/balancer/settings.py,
    where each is declared, with its flag and meaning). Every limit is enforced as bytes
    arrive, so memory and time per connection stay bounded whatever a client sends: a
    head over `max_head_bytes` or `max_headers` gets 431, a body over `max_body_bytes` 413,
    a head not complete `head_timeout_s` after its first byte or a body not complete
    `body_timeout_s` after its head 408 (trickled bytes extend neither; both are checked
    once a second).
    """

    max_body_bytes: int
    max_head_bytes: int
    max_headers: int
    head_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    keepalive_requests: int  # answers a connection carries, then one closes it; 0: no cap
    send_timeout_s: float
    max_pipelined: int
    max_connections: int


class Handler(Protocol):
    """What the server calls for each request (`app.BalancerApp`)."""

    def handle(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        body: bytes,
    ) -> Awaitable[Reply]: ...

    def too_large(self) -> Reply: ...

    def over_budget(self, why: str) -> Reply: ...


class ConnState(StrEnum):
    """Where a client connection's reading is (h11-style explicit states)."""

    IDLE = "idle"  # between requests (keep-alive), nothing of the next one read
    HEAD = "head"  # reading a request line and headers
    BODY = "body"  # reading a body within the limits
    DRAINING = "draining"  # a closing answer is queued: later bytes are read and dropped
    CLOSED = "closed"


#: Every transition a connection may take; `_ClientConnection._to` refuses any other.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.IDLE: frozenset({ConnState.HEAD, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.HEAD: frozenset(
        {ConnState.BODY, ConnState.IDLE, ConnState.DRAINING, ConnState.CLOSED}
    ),
    ConnState.BODY: frozenset({ConnState.IDLE, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.DRAINING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}

# The states as module constants: read on every request, a global is the cheapest lookup.
_IDLE, _HEAD, _BODY = ConnState.IDLE, ConnState.HEAD, ConnState.BODY
_DRAINING, _CLOSED = ConnState.DRAINING, ConnState.CLOSED

#: Seconds a closing connection keeps reading (and dropping) what the client still sends
#: after its last answer, so that answer is not lost to a reset (a lingering close).
LINGER_S = 2.0


#: Method names by the bytes the parser gives (others are decoded as they come).
_METHOD_NAMES: dict[bytes, str] = {
    m.encode("ascii"): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT")
}


def _method_name(method: bytes) -> str:
    name = _METHOD_NAMES.get(method)
    return name if name is not None else method.decode("ascii")


def _status_line(status_code: int) -> bytes:
    line = _STATUS_LINES.get(status_code)
    return line if line is not None else f"HTTP/1.1 {status_code} \r\n".encode("ascii")


def _shutting_down() -> Reply:
    return json_reply(503, "the balancer is shutting down; send the request again")


@dataclass(slots=True)
class _Parsed:
    """One request read off a client connection (or an answer decided while reading it)."""

    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes  # charged to the memory budget until the request is answered
    keep_alive: bool
    early: Reply | None = None
    http10: bool = False


class _ClientConnection(asyncio.Protocol):
    """One client connection: httptools parses, requests are answered one at a time in order.

    Each complete request goes to the handler (`BalancerApp.handle`); each answer is one
    transport write. The reading side follows `TRANSITIONS`.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.handler
        self.limits = server.limits
        self.limit = server.limits.max_body_bytes
        self.budget = server.budget
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.pending: deque[_Parsed] = deque()
        self.task: asyncio.Task | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.state = _IDLE
        self.busy = False
        self.paused = False  # reading paused: max_pipelined requests are queued
        self.write_paused = False  # the client's write buffer is over its high-water mark
        self.stash: bytes | memoryview | None = None  # input read, not parsed yet (charged)
        self.later = False  # parsing of the stash goes on in the next turn of the loop
        self.buffered = 0  # bytes in the write buffer, charged to the budget
        self.sent_at = 0.0  # when the write buffer last shrank (or began to hold bytes)
        self.refusal: Reply | None = None
        self.finished = False  # the last answer is written; the connection is closing
        self.peer_eof = False  # the client half-closed: it will send nothing more
        self.answered = 0  # answers written
        # The request being parsed.
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: bytes | bytearray = b""  # the first piece, then one growing buffer
        self.size = 0  # body bytes read
        self.reserved = 0  # bytes of the body charged to the budget (at least `size`)
        self.declared = 0  # Content-Length
        self.hosts = 0  # Host headers
        self.expect = False
        self.connection_header = False  # the request has a Connection header
        self.keep_alive = True
        self.http10 = False
        self.head_bytes = 0
        self.head_started = 0.0
        self.body_started = 0.0
        self.last_active = server.clock

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    def _to(self, state: ConnState) -> None:
        if state is self.state:
            return
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connection cannot go from {self.state} to {state}")
        self.state = state

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        server = self.server
        server.connections.add(self)
        self.task = server.loop.create_task(self._serve())
        server.tasks.add(self.task)
        self.task.add_done_callback(server.tasks.discard)
        if len(server.connections) > self.limits.max_connections and not server.evict():
            self._break(json_reply(503, "too many connections to the balancer"))
        else:
            server.waiting[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self._drop_input()
        self._clear_pending()
        if self.buffered:
            self.budget.used -= self.buffered
            self.buffered = 0
        self.server.connections.discard(self)
        self.server.waiting.pop(self, None)
        self._wake()

    def eof_received(self) -> bool:
        """The client sent all it will send: answer what it asked (the connection stays
        open for writing), then close; a request it did not finish is dropped."""
        self.peer_eof = True
        if self.finished and self.transport is not None:
            # Lingering after the last answer: the client is done sending, so the close
            # cannot reset what it has still to read.
            self.transport.close()
            return True
        if self.state is not _DRAINING and self.state is not _CLOSED:
            self._to(_DRAINING)
            self._drop_input()
            self.server.waiting.pop(self, None)
            self._wake()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None:
            self._charge_buffer(self.transport.get_write_buffer_size())
        self._wake()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _DRAINING or state is _CLOSED:
            return  # a closing answer is queued: read and drop (lingering close)
        self.last_active = self.server.clock
        if self.stash is not None:
            self._hold(data)  # requests are queued: this waits its turn
        elif len(data) > PARSE_SLICE:
            self._feed_slices(data)
        else:
            self._feed(data)

    # feeding the parser
    def _feed(self, data: bytes | memoryview) -> None:
        state = self.state
        if state is _IDLE or state is _HEAD:
            # Counted as bytes arrive: the parser would buffer a header line without end.
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgrade_refused()
            return
        except httptools.HttpParserError as err:
            refusal = self.refusal or (
                _refusal_431(self.limits.max_head_bytes)
                if self.head_bytes > self.limits.max_head_bytes
                else json_reply(400, f"malformed HTTP request: {err}")
            )
            self._break(refusal)
            return
        if self.state is _HEAD and self.head_bytes > self.limits.max_head_bytes:
            self._break(_refusal_431(self.limits.max_head_bytes))

    def _feed_slices(self, data: bytes | memoryview) -> None:
        """Parse `data` a slice at a time while fewer than `max_pipelined` requests wait
        (the rest is held until the answers catch up) and for at most TURN_S (the rest is
        held for the next turn of the loop)."""
        view = memoryview(data)
        end = len(view)
        at = 0
        most = self.limits.max_pipelined
        until = perf_counter() + TURN_S
        while at < end:
            state = self.state
            if state is _DRAINING or state is _CLOSED:
                return
            if len(self.pending) > most:
                self._hold(view[at:])
                return
            if at and perf_counter() > until:
                self._hold(view[at:])
                if not self.later:
                    self.later = True
                    self.server.loop.call_soon(self._next_turn)
                return
            self._feed(view[at : at + PARSE_SLICE])
            at += PARSE_SLICE

    def _next_turn(self) -> None:
        self.later = False
        if len(self.pending) <= self.limits.max_pipelined:
            self._resume_input()

    def _hold(self, data: bytes | memoryview) -> None:
        """Keep input for later (reading is paused meanwhile), charged to the budget.

        Input held in the middle of a body not known to be small (`memory.known_small`:
        without a length, or over SMALL_BODY_BYTES) continues that body and is charged as
        it is: past the large bodies' share the request is refused (503) and the input
        dropped, so read-ahead of many uploads cannot take the last eighth from small
        requests and answers. Other input read already is charged whatever the budget
        holds."""
        n = len(data)
        body = self.declared or None  # in the middle of a body, 0 is a body without a length
        if self.state is _BODY and not known_small(body):
            if not self.budget.take(n, body):
                self._break(self.app.over_budget(self.budget.refusal()))
                return
        else:
            self.budget.force(n)
        stash = self.stash
        self.stash = data if stash is None else bytes(stash) + bytes(data)
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume_input(self) -> None:
        """Parse held input (as much as this turn allows), then read again once none is
        left and the queue has room."""
        stash = self.stash
        if stash is not None:
            self.stash = None
            self.budget.used -= len(stash)
            self._feed_slices(stash)
            if self.stash is not None or len(self.pending) > self.limits.max_pipelined:
                return
        if self.paused and self.state is not _CLOSED and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._to(_HEAD)
        self.url = b""
        self.headers = []
        self.body = b""
        self.size = 0
        self.reserved = 0
        self.declared = 0
        self.hosts = 0
        self.head_bytes = 0
        self.head_started = self.server.clock
        self.expect = False
        self.connection_header = False
        self.refusal = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_head_bytes:
            self.refusal = _refusal_431(self.limits.max_head_bytes)
            raise ValueError("request line too long")  # the parser raises HttpParserError

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_headers:
            self.refusal = json_reply(
                431, f"request has more than {self.limits.max_headers} header lines"
            )
            raise ValueError("too many headers")
        name = name.lower()
        self.headers.append((name, value))
        if name == b"host":
            self.hosts += 1
        elif name == b"content-length":
            # The parser has checked the value is a number (or raised).
            self.declared = int(value)
        elif name == b"expect":
            self.expect = value.lower() == b"100-continue"
        elif name == b"connection":
            self.connection_header = True

    def on_headers_complete(self) -> None:
        self._to(_BODY)
        parser = self.parser
        self.method = method = parser.get_method()
        self.keep_alive = keep_alive = parser.should_keep_alive()
        self.http10 = False
        if self.hosts != 1 or self.connection_header or not keep_alive:
            # An HTTP/1.1 request that keeps its connection without a Connection header is
            # the common case and needs no version check: any other version closes by
            # default (llhttp), and a string per request costs measurably.
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                self.refusal = json_reply(
                    505, f"HTTP/{version} is not supported: send HTTP/1.1 or HTTP/1.0"
                )
                raise ValueError("version")
            if self.hosts > 1:
                self.refusal = json_reply(400, "a request must have at most one Host header")
                raise ValueError("hosts")
            if self.hosts == 0 and version == "1.1":
                self.refusal = json_reply(400, "an HTTP/1.1 request needs a Host header")
                raise ValueError("no host")
            # HTTP/1.0 keeps a connection only when a Connection header asks for it.
            self.http10 = self.connection_header and version == "1.0"
        if method == b"CONNECT":
            self.refusal = json_reply(
                405, "CONNECT is not supported: the balancer is not a forward proxy"
            )
            raise ValueError("CONNECT")
        declared = self.declared
        if declared > self.limit:
            self.refusal = self.app.too_large()
            raise ValueError("too large")
        budget = self.budget
        if budget.used >= budget.limit or not budget.take(declared, declared):
            self.refusal = self.app.over_budget(budget.refusal())
            raise ValueError("over budget")
        self.reserved = declared  # a body with a length is charged whole, before it comes
        self.body_started = self.server.clock
        if self.expect and not self.pending and not self.busy:
            # Nothing is being answered on this connection, so the interim answer is in order.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        size = self.size + len(body)
        if size > self.reserved:
            self._reserve(size)
        self.size = size
        # Inline, as memory.grow (a body in 2-byte chunks calls this for every 2 bytes).
        held = self.body
        if type(held) is bytearray:
            held += body
        elif held:
            self.body = bytearray(held) + body
        else:
            self.body = body

    def _reserve(self, size: int) -> None:
        """Charge more of a body without a length to the budget: double what is charged
        (at least BODY_STEP, at most the body limit); refuse past either limit. Its size
        is not known, so the budget counts it as a large body, however far it has come."""
        if size > self.limit:
            self.refusal = self.app.too_large()
            raise ValueError("too large")
        want = min(max(size, 2 * self.reserved, BODY_STEP), self.limit)
        if not self.budget.take(want - self.reserved, None):
            self.refusal = self.app.over_budget(self.budget.refusal())
            raise ValueError("over budget")
        self.reserved = want

    def on_message_complete(self) -> None:
        body = self.body
        self._to(_IDLE)
        if type(body) is bytearray:
            body = bytes(body)
        self.body = b""
        # The request holds a charge of its body's size, given back once it is answered.
        self.budget.used -= self.reserved - self.size
        self.size = self.reserved = 0
        self.server.waiting.pop(self, None)
        self._queue(
            _Parsed(
                _method_name(self.method),
                self.url,
                self.headers,
                body,  # type: ignore[arg-type]
                self.keep_alive,
                http10=self.http10,
            )
        )

    # internals
    def _upgrade_refused(self) -> None:
        """A request asking to switch protocols: it was answered (or is queued) as plain
        HTTP, which refuses the upgrade (RFC 9110 7.8); what follows it is in another
        protocol, so nothing more is read and the connection closes after the answers."""
        if self.pending and self.pending[-1].early is None:
            self.pending[-1].keep_alive = False
            self._to(_DRAINING)
            self._drop_input()
            self._wake()
        elif self.busy:
            self._to(_DRAINING)
            self._drop_input()
        else:
            self._break(json_reply(400, "protocol upgrades are not supported"))

    def _drop_input(self) -> None:
        """Forget the body being read and any held input, giving back their charges."""
        budget = self.budget
        if self.reserved:
            budget.used -= self.reserved
        self.size = self.reserved = 0
        self.body = b""
        if self.stash is not None:
            budget.used -= len(self.stash)
            self.stash = None

    def _clear_pending(self) -> None:
        budget = self.budget
        for parsed in self.pending:
            budget.used -= len(parsed.body)
        self.pending.clear()

    def _break(self, reply: Reply) -> None:
        """An unreadable or refused stream: answer after what is queued, then close."""
        if self.state is _DRAINING or self.state is _CLOSED:
            return
        self._to(_DRAINING)
        self._drop_input()
        self.server.waiting.pop(self, None)
        self._queue(_Parsed("GET", b"", [], b"", False, early=reply))

    def _queue(self, parsed: _Parsed) -> None:
        self.pending.append(parsed)
        if (
            len(self.pending) > self.limits.max_pipelined
            and not self.paused
            and self.transport is not None
        ):
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _serve(self) -> None:
        """The connection's one task: answer queued requests in order, sleep when idle.

        Pipelined requests are answered one per turn of the event loop, and none while the
        client leaves earlier answers unread (write back-pressure). Cancelled by the end
        of the shutdown grace, it answers 503 to the request in progress and to every one
        still queued, then closes.
        """
        # One long-lived task per connection, not one per request: task creation and
        # registration cost measurably more than a future per idle period.
        loop = self.server.loop
        pending = self.pending
        server = self.server
        half = self.limits.max_pipelined // 2
        cut = False  # the shutdown grace ran out
        on_answer = server.on_answer
        while self.state is not _CLOSED and not self.finished:
            if not pending or (self.write_paused and not cut):
                if not pending and (server.cut or self.state is _DRAINING or cut):
                    self._close()
                    break
                self.waiter = loop.create_future()
                try:
                    await self.waiter
                except asyncio.CancelledError:
                    if not server.stopping:
                        raise
                    cut = True
                continue
            parsed = pending.popleft()
            began = perf_counter() if on_answer is not None else 0.0
            try:
                reply = parsed.early
                if reply is None:
                    if server.cut:  # read, not started, and the drain is over
                        reply = _shutting_down()
                    else:
                        self.busy = True
                        try:
                            reply = self._dispatch(parsed)
                            if not isinstance(reply, Reply):
                                reply = await reply
                        except asyncio.CancelledError:
                            if not server.stopping:
                                raise
                            cut = True
                            reply = _shutting_down()
                        except Exception:
                            log.exception("request %s %r failed", parsed.method, parsed.url)
                            reply = json_reply(500, "internal error in the balancer")
                            parsed.keep_alive = False
                        finally:
                            self.busy = False
                self._write(reply, parsed)
                if on_answer is not None:
                    on_answer(reply.status, perf_counter() - began)
            finally:
                if parsed.body:
                    self.budget.used -= len(parsed.body)
            if self.paused and len(pending) <= half and self.state is not _CLOSED:
                self._resume_input()
            if pending:
                if not cut:
                    # One pipelined request per loop turn: the other connections' work
                    # comes between two of this one's.
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        if not server.stopping:
                            raise
                        cut = True
            elif not self.finished and self.state is not _DRAINING and self.state is not _CLOSED:
                server.waiting[self] = None  # waiting for the client's next request

    def _dispatch(self, parsed: _Parsed) -> Reply | Awaitable[Reply]:
        """The request target split into path and query, handed to the handler (whose
        awaitable `_serve` awaits: one coroutine less on the hot path); a bad target is
        answered here."""
        url = parsed.url
        if url[:1] != b"/":
            if parsed.method == "OPTIONS" and url == b"*":
                return json_reply(400, "OPTIONS * is not proxied; ask a path")
            try:
                parts = httptools.parse_url(url)  # absolute form: proxy-style request target
            except httptools.HttpParserInvalidURLError:
                return json_reply(400, "malformed request target")
            path, query = parts.path or b"/", parts.query or b""
        else:
            path, _, query = url.partition(b"?")
            frag = path.find(b"#")
            if frag >= 0:
                path = path[:frag]
        return self.app.handle(
            parsed.method,
            path,
            query,
            parsed.headers,
            self.client,
            self.server.sockname,
            parsed.body,
        )

    def _write(self, reply: Reply, parsed: _Parsed) -> None:
        transport = self.transport
        if self.closed or self.finished or transport is None:
            return
        self.answered += 1
        cap = self.limits.keepalive_requests
        # Past its cap, a connection is closed by the first answer with nothing of a next
        # request read behind it (queued, parsed in part, or held back): a pipelining
        # client loses none of what it sent. Draining, only requests queued are kept.
        capped = (
            0 < cap <= self.answered
            and self.state is _IDLE
            and not (self.pending or self.stash or self.paused)
        )
        ending = self.server.stopping and not self.pending
        keep_alive = parsed.keep_alive and not (capped or ending)
        if not keep_alive:
            hop = b"connection: close\r\n"
        elif parsed.http10:
            # HTTP/1.0 closes by default: a kept connection must be said so (RFC 9112 9.3).
            hop = b"connection: keep-alive\r\n"
        else:
            hop = b""
        parts = [_status_line(reply.status)]
        for name, value in reply.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (hop, self.server.date_line, b"\r\n")
        body = reply.body
        if parsed.method == "HEAD" or len(body) <= WRITTEN_APART_BYTES:
            if parsed.method != "HEAD":
                parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.writelines((b"".join(parts), body))
        size = transport.get_write_buffer_size()
        if size or self.buffered:
            self._charge_buffer(size)
        if not keep_alive:
            self._close()

    def _charge_buffer(self, size: int) -> None:
        """The write buffer holds `size` bytes: charge the difference to the budget; the
        send deadline runs from the last time it shrank."""
        before = self.buffered
        if size < before or not before:
            self.sent_at = self.server.clock
        self.budget.force(size - before)
        self.buffered = size

    def _close(self) -> None:
        """Close after the answers written: half-close, then keep reading (and dropping)
        for LINGER_S so the client's unread bytes do not turn the close into a reset that
        would destroy the answer before the client reads it. A client that has half-closed
        already has nothing more to send: its connection closes once the answers are out."""
        if self.closed or self.finished:
            return
        self.finished = True
        self._clear_pending()
        self._to(_DRAINING)
        self._drop_input()
        self.server.waiting.pop(self, None)
        transport = self.transport
        if transport is None:
            self.state = _CLOSED
            return
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if transport.can_write_eof() and not self.peer_eof:
            transport.write_eof()
            self.server.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()  # what is written is still sent, then the socket closes
        self._wake()

    def _drop(self) -> None:
        """Abort the connection at once (a client that reads nothing of its answers)."""
        self.finished = True
        if self.transport is not None:
            self.transport.abort()

    def _evict(self) -> None:
        """Make room for a new connection: this one has waited longest for its client; a
        request it was receiving gets 408."""
        self.server.waiting.pop(self, None)
        transport = self.transport
        if self.closed or self.finished or transport is None:
            return
        if self.state is _HEAD or self.state is _BODY:
            reply = json_reply(
                408, "request not complete when its connection was needed for another client"
            )
            self._write(reply, _Parsed("GET", b"", [], b"", False))
        else:
            self.finished = True
            self._clear_pending()
            self._drop_input()
            transport.close()
        self.server.loop.call_later(LINGER_S, transport.abort)

    def check_deadlines(self, now: float, limits: ServerLimits) -> None:
        """The server's once-a-second look: send, head, body and idle deadlines."""
        if self.buffered and self.transport is not None:
            size = self.transport.get_write_buffer_size()
            if size < self.buffered:
                self._charge_buffer(size)
            elif now - self.sent_at > limits.send_timeout_s:
                self._drop()  # it reads nothing: what it holds is given back when it is lost
                return
        if self.busy or self.pending:
            return
        state = self.state
        if state is _HEAD and now - self.head_started > limits.head_timeout_s:
            self._break(
                json_reply(408, f"request head not complete within {limits.head_timeout_s} s")
            )
        elif state is _BODY and now - self.body_started > limits.body_timeout_s:
            self._break(
                json_reply(408, f"request body not complete within {limits.body_timeout_s} s")
            )
        elif state is _IDLE and now - self.last_active > limits.keepalive_timeout_s:
            self._close()

    @property
    def idle(self) -> bool:
        """Waiting for the client's next request, with nothing of it read."""
        return self.state is _IDLE and not self.busy and not self.pending and not self.finished

    def shutdown(self) -> None:
        """The drain is over: close now if idle; a request being received is answered
        503; one being answered is cut by the server (503)."""
        if not self.busy and not self.pending:
            if self.state is _HEAD or self.state is _BODY:
                self._break(_shutting_down())
            else:
                self._close()
        self._wake()


def _refusal_431(limit: int) -> Reply:
    return json_reply(431, f"request head over {limit} bytes")


class HttpServer:
    """The balancer's HTTP/1.1 server: keep-alive, in-order answers, one listening port."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        budget: MemoryBudget,
        on_answer: Callable[[int, float], None] | None = None,
    ) -> None:
        self.handler = handler
        #: Called with each answer's status and the seconds from its request's dispatch
        #: to its write (the balancer's request duration histogram).
        self.on_answer = on_answer
        self.limits = limits
        self.budget = budget
        self.pages = PageReturner(budget)
        self.loop = asyncio.get_running_loop()
        self.connections: set[_ClientConnection] = set()
        # Connections waiting for their client (idle, or a head or body arriving), the
        # longest-waiting first: the first to go when a new connection needs the room.
        self.waiting: dict[_ClientConnection, None] = {}
        self.evicted = 0
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False  # draining: no new connections, each answer closes its own
        self.cut = False  # the drain is over: what is left is answered 503
        self.sockname: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self.date_line = b""
        self.clock = self.loop.time()
        self._clock: asyncio.TimerHandle | None = None
        self._sweep: list[_ClientConnection] = []  # connections left to look at this second
        self._ticks = 0
        self._tick()

    def _tick(self) -> None:
        """Ten times a second: the coarse clock, and a tenth of the connections' deadlines
        looked at (every connection once a second, and never 10,000 in one turn of the
        loop); once a second the Date header, and memory given back once a load passed."""
        self.clock = now = self.loop.time()
        if self._ticks % SWEEPS == 0:
            # Backends' Date headers are dropped (as hop-specific as Server), so the balancer
            # dates its answers itself (RFC 9110 section 6.6.1), at a second's resolution.
            self.date_line = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
            self.pages.poll(self.loop)
            self._sweep = list(self.connections)
        self._ticks += 1
        sweep = self._sweep
        limits = self.limits
        for _ in range(min(len(sweep), -(-len(self.connections) // SWEEPS))):
            conn = sweep.pop()
            if not conn.closed:
                conn.check_deadlines(now, limits)
        self._clock = self.loop.call_later(1.0 / SWEEPS, self._tick)

    def evict(self) -> bool:
        """Close the connection that has waited longest for its client; False if none
        waits (every connection is being answered)."""
        victim = next(iter(self.waiting), None)
        if victim is None:
            return False
        self.connections.discard(victim)
        self.evicted += 1
        victim._evict()
        return True

    async def start(
        self,
        host: str,
        port: int,
        backlog: int = 2048,
        sock: socket.socket | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """Listen on host:port, or on `sock`, a listening socket given (inherited from the
        process that started this one: several processes then accept from one queue);
        with `ssl`, every connection is TLS."""
        if sock is not None:
            self._server = await self.loop.create_server(
                lambda: _ClientConnection(self), sock=sock, backlog=backlog, ssl=ssl
            )
        else:
            self._server = await self.loop.create_server(
                lambda: _ClientConnection(self),
                host,
                port,
                backlog=backlog,
                reuse_address=True,
                ssl=ssl,
            )
        name = self._server.sockets[0].getsockname()
        self.sockname = (str(name[0]), int(name[1]))

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Drain, then close. The listener closes at once; for `grace_s` the requests in
        flight, queued and arriving on open connections are still served, each answer
        closing its connection, and a connection idle for DRAIN_IDLE_S is closed; then
        what is left (answers in progress, requests read but not started, requests half
        received) is answered 503, and every connection closes."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        deadline = self.loop.time() + grace_s
        while self.connections and self.loop.time() < deadline:
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.idle and now - conn.last_active >= DRAIN_IDLE_S:
                    conn._close()
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.loop.time())))
        self.cut = True
        if self._clock is not None:
            self._clock.cancel()
        for conn in list(self.connections):
            conn.shutdown()
        busy = [t for t in self.tasks if not t.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=0.05)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for conn in list(self.connections):
            transport = conn.transport
            if transport is None:
                continue
            if transport.get_write_buffer_size():
                transport.abort()  # a client that does not read: nothing more will reach it
            else:
                transport.close()  # the kernel still delivers what was written
