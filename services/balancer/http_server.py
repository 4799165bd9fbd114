"""The balancer's HTTP/1.1 server: httptools parsing, keep-alive, in-order answers.

`HttpServer(handler, limits)` serves any `Handler`: each complete request within the
limits is handed to `handler.handle(...)` and its `Reply` goes out in one transport
write; a body over the limit is answered by `handler.too_large()` while the rest of it
is read into the void. Chosen by measurement over uvicorn for the proxy path (no ASGI
scope, no Request objects, no routing).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from email.utils import formatdate
from enum import StrEnum
from http import HTTPStatus
from typing import Any, Protocol

import httptools
import orjson

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

#: Requests parsed ahead of the one being answered before the connection stops reading.
MAX_PIPELINED = 16

#: Largest request line plus headers; a larger head gets 431 and the connection closes.
MAX_HEAD_BYTES = 64 * 1024

#: Seconds an idle keep-alive client connection stays open.
KEEPALIVE_TIMEOUT_S = 30.0

#: Seconds in-flight requests get to finish after SIGTERM before connections are dropped.
SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client connection may send before it is refused.

    Every limit is enforced as bytes arrive, so memory and time per connection stay
    bounded whatever a client sends: a head over `max_head_bytes` or `max_headers` gets
    431, a head not complete `head_timeout_s` after its first byte gets 408 (trickled bytes
    do not extend it), a body over `max_body_bytes` gets 413, and past `max_connections`
    a new connection gets 503 and is closed.
    """

    max_body_bytes: int
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = 100
    head_timeout_s: float = 10.0
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    max_pipelined: int = MAX_PIPELINED
    max_connections: int = 10_000


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


class ConnState(StrEnum):
    """Where a client connection's reading is (h11-style explicit states)."""

    IDLE = "idle"  # between requests (keep-alive), nothing of the next one read
    HEAD = "head"  # reading a request line and headers
    BODY = "body"  # reading a body within the limit
    DISCARD = "discard"  # reading a refused body into the void (an early answer is queued)
    DRAINING = "draining"  # a closing answer is queued: later bytes are read and dropped
    CLOSED = "closed"


#: Every transition a connection may take; `_ClientConnection._to` refuses any other.
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.IDLE: frozenset({ConnState.HEAD, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.HEAD: frozenset(
        {ConnState.BODY, ConnState.IDLE, ConnState.DISCARD, ConnState.DRAINING, ConnState.CLOSED}
    ),
    ConnState.BODY: frozenset(
        {ConnState.IDLE, ConnState.DISCARD, ConnState.DRAINING, ConnState.CLOSED}
    ),
    ConnState.DISCARD: frozenset({ConnState.IDLE, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.DRAINING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}

# The states as module constants: read on every request, a global is the cheapest lookup.
_IDLE, _HEAD, _BODY = ConnState.IDLE, ConnState.HEAD, ConnState.BODY
_DISCARD, _DRAINING, _CLOSED = ConnState.DISCARD, ConnState.DRAINING, ConnState.CLOSED

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


@dataclass(slots=True)
class _Parsed:
    """One request read off a client connection (or an answer decided while reading it)."""

    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    early: Reply | None = None
    http10: bool = False


class _HeadRefused(Exception):
    """A request head over a limit; carries the answer."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


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
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.pending: deque[_Parsed] = deque()
        self.task: asyncio.Task | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.state = _IDLE
        self.busy = False
        self.expect = False
        self.connection_header = False  # the request has a Connection header
        self.method = b""
        self.paused = False
        self.refusal: Reply | None = None
        self.finished = False  # the last answer is written; the connection is closing
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.head_bytes = 0
        self.head_started = 0.0
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
        self.server.connections.add(self)
        self.task = self.server.loop.create_task(self._serve())
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)
        if len(self.server.connections) > self.limits.max_connections:
            self._break(json_reply(503, "too many connections to the balancer"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self.pending.clear()
        self.server.connections.discard(self)
        self._wake()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _DRAINING or state is _CLOSED:
            return  # a closing answer is queued: read and drop (lingering close)
        self.last_active = self.server.clock
        if state is _IDLE or state is _HEAD:
            # Counted as bytes arrive: the parser would buffer a header line without end.
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except _HeadRefused as refused:
            self._break(refused.reply)
            return
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

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._to(_HEAD)
        self.url = b""
        self.headers = []
        self.body = []
        self.size = 0
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
        if name == b"content-length":
            # The parser has checked the value is a number (or raised).
            self.size = -int(value)
        elif name == b"expect":
            self.expect = value.lower() == b"100-continue"
        elif name == b"connection":
            self.connection_header = True

    def on_headers_complete(self) -> None:
        self._to(_BODY)
        self.method = method = self.parser.get_method()
        if method == b"CONNECT":
            self.refusal = json_reply(
                405, "CONNECT is not supported: the balancer is not a forward proxy"
            )
            raise ValueError("CONNECT")
        if -self.size > self.limit:
            self._answer_early(self.app.too_large())
        self.size = 0
        if (
            self.state is _BODY
            and self.transport is not None
            and self.expect
            and not self.pending
            and not self.busy
        ):
            # Nothing is being answered on this connection, so the interim answer is in order.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.state is _DISCARD:
            return
        self.size += len(body)
        if self.size > self.limit:
            self.body = []
            self._answer_early(self.app.too_large())
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.state is _DISCARD:
            self._to(_IDLE)  # the early answer is queued; the body was dropped
            return
        body = self.body
        self._to(_IDLE)
        parser = self.parser
        self._queue(
            _Parsed(
                _method_name(self.method),
                self.url,
                self.headers,
                body[0] if len(body) == 1 else b"".join(body),
                parser.should_keep_alive(),
                # HTTP/1.0 keeps a connection only when a Connection header asks for it.
                http10=self.connection_header and parser.get_http_version() == "1.0",
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
            self._wake()
        elif self.busy:
            self._to(_DRAINING)
        else:
            self._break(json_reply(400, "protocol upgrades are not supported"))

    def _answer_early(self, reply: Reply) -> None:
        """Queue the answer now and read the rest of this request's body into the void."""
        if self.state is _DISCARD:
            return
        self._to(_DISCARD)
        self._queue(
            _Parsed(
                _method_name(self.method),
                self.url,
                self.headers,
                b"",
                self.parser.should_keep_alive(),
                early=reply,
            )
        )

    def _break(self, reply: Reply) -> None:
        """An unreadable or refused stream: answer after what is queued, then close."""
        if self.state is _DRAINING or self.state is _CLOSED:
            return
        self._to(_DRAINING)
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
            waiter.set_result(None)

    async def _serve(self) -> None:
        """The connection's one task: answer queued requests in order, sleep when idle."""
        # One long-lived task per connection, not one per request: task creation and
        # registration cost measurably more than a future per idle period.
        loop = self.server.loop
        pending = self.pending
        while self.state is not _CLOSED and not self.finished:
            if not pending:
                if self.server.stopping or self.state is _DRAINING:
                    self._close()
                    break
                self.waiter = loop.create_future()
                await self.waiter
                continue
            parsed = pending.popleft()
            self.busy = True
            try:
                reply = parsed.early or self._dispatch(parsed)
                if not isinstance(reply, Reply):
                    reply = await reply
            except Exception:
                log.exception("request %s %r failed", parsed.method, parsed.url)
                reply = json_reply(500, "internal error in the balancer")
                parsed.keep_alive = False
            self.busy = False
            self._write(reply, parsed)
            if (
                self.paused
                and len(pending) <= self.limits.max_pipelined // 2
                and self.state is not _CLOSED
                and self.transport is not None
            ):
                self.paused = False
                self.transport.resume_reading()

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
        if self.closed or self.finished or self.transport is None:
            return
        keep_alive = parsed.keep_alive and not self.server.stopping
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
        if parsed.method != "HEAD":
            parts.append(reply.body)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        """Close after the answers written: half-close, then keep reading (and dropping)
        for LINGER_S so the client's unread bytes do not turn the close into a reset that
        would destroy the answer before the client reads it."""
        if self.closed or self.finished:
            return
        self.finished = True
        self.pending.clear()
        self._to(_DRAINING)
        transport = self.transport
        if transport is None:
            self.state = _CLOSED
            return
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self.server.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()
        self._wake()

    def shutdown(self) -> None:
        """Stop taking requests: close now if idle, else after the answer in progress."""
        if not self.busy and not self.pending:
            self._close()
        self._wake()


def _refusal_431(limit: int) -> Reply:
    return json_reply(431, f"request head over {limit} bytes")


class HttpServer:
    """The balancer's HTTP/1.1 server: keep-alive, in-order answers, one listening port."""

    def __init__(self, handler: Handler, limits: ServerLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[_ClientConnection] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self.sockname: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self.date_line = b""
        self.clock = self.loop.time()
        self._clock: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        """Once a second: the Date header, the coarse clock, idle and slow connections."""
        # Backends' Date headers are dropped (as hop-specific as Server), so the balancer
        # dates its answers itself (RFC 9110 section 6.6.1), at a second's resolution.
        self.date_line = b"date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
        self.clock = now = self.loop.time()
        limits = self.limits
        for conn in list(self.connections):
            if conn.busy or conn.pending:
                continue
            if conn.state is _HEAD and now - conn.head_started > limits.head_timeout_s:
                conn._break(
                    json_reply(408, f"request head not complete within {limits.head_timeout_s} s")
                )
            elif conn.state is _IDLE and now - conn.last_active > limits.keepalive_timeout_s:
                conn._close()
        self._clock = self.loop.call_later(1.0, self._tick)

    async def start(self, host: str, port: int, backlog: int = 2048) -> None:
        self._server = await self.loop.create_server(
            lambda: _ClientConnection(self), host, port, backlog=backlog, reuse_address=True
        )
        sock = self._server.sockets[0].getsockname()
        self.sockname = (str(sock[0]), int(sock[1]))

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop listening, let answers in progress finish (bounded), close every connection."""
        self.stopping = True
        if self._clock is not None:
            self._clock.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=grace_s)
            for task in late:
                task.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
