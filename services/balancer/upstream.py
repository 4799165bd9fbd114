"""The balancer's upstream HTTP/1.1 client: a lean keep-alive pool per backend.

Built on asyncio protocols and httptools' response parser (the C parser uvicorn also uses),
because the proxy hot path measured clearly faster this way than through aiohttp's
ClientSession, and httpx's pool is slow under concurrency (docs/DESIGN.md, "The hot
path"). Each try sends a fully buffered request and reads a fully buffered response (the
balancer compares whole bodies in audits and quorum reads), under one deadline covering
connect, send and receive. An answer's body is charged to the process's memory budget
(`memory.MemoryBudget`) as it arrives and given back when the try ends; a try whose
answer would pass the budget fails with `UpstreamOverBudget`, the balancer's own doing,
not the backend's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import ssl
from collections import deque
from dataclasses import dataclass
from operator import attrgetter
from urllib.parse import urlsplit

import httptools
from twlb.balancer.memory import MemoryBudget, grow

#: Headers that belong to one connection and are never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Methods that may be sent again, on another backend or after a kept-alive connection
#: failed (RFC 9110 idempotent methods): a POST may already have been applied.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

#: Response headers the balancer sets itself (as nginx hides Date and Server by default).
RESPONSE_DROPPED: frozenset[bytes] = HOP_BY_HOP | {b"content-length", b"date", b"server"}

#: Request headers the balancer sets itself.
REQUEST_DROPPED: frozenset[bytes] = HOP_BY_HOP | {b"content-length", b"host", b"expect"}


class UpstreamError(Exception):
    """A try that got no HTTP answer."""


class UpstreamTimeout(UpstreamError):
    """No complete answer within the per-try timeout."""


class UpstreamConnectError(UpstreamError):
    """Refused, reset, dropped or garbled connection."""


class UpstreamTooLarge(UpstreamConnectError):
    """An answer over the configured caps (head bytes, header count, body bytes): a bad
    upstream, never streamed to the client; the connection is dropped."""


class UpstreamOverBudget(UpstreamError):
    """The answer arrived while the balancer's memory budget was spent: the try was given
    up by the balancer, not failed by the backend; the connection is dropped."""


#: Why a parser callback stopped an answer (`_Connection._refused`).
_TOO_LARGE, _OVER_BUDGET = "too large", "over budget"

#: Answer headers whose presence `UpstreamResponse.noted` flags (the slow path of
#: `app.upstream_reply`: tokens of Connection to drop, a Location to rewrite).
NOTED_HEADERS: frozenset[bytes] = frozenset({b"connection", b"location", b"content-location"})


def _over(length: bytes, limits: UpstreamLimits) -> bool:
    """Whether a Content-Length value is over the body cap (a malformed one is the
    parser's to refuse)."""
    return length.strip().isdigit() and int(length) > limits.max_body_bytes


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """What one backend's answer may weigh before the try fails as a bad upstream (the
    values come from `BalancerSettings.upstream_limits`, their one declaration).

    Every byte a backend sends is counted as it arrives, so memory stays bounded by these
    caps whatever the backend sends (an endless chunked body, a header line without end).
    """

    max_head_bytes: int
    max_headers: int
    max_body_bytes: int


class BackendURLError(ValueError):
    """A backend URL the balancer cannot use; the message says why."""


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _valid_host(host: str) -> bool:
    """An IP literal or a DNS name, as the upstream client will connect to it: no control
    characters, spaces, or anything a resolver would read differently from the text."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


#: Default port of each scheme a backend may have.
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_backend_url(url: str) -> str:
    """Check a backend URL and return its canonical form `http://host:port` or
    `https://host:port` (HTTP/1.1, over TLS for https, verified: tls.py).

    A path, query, fragment or credentials would be silently ignored, so they are errors.
    """
    if not isinstance(url, str) or not url.strip():
        raise BackendURLError("backend URL is empty")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url.strip()):
        raise BackendURLError(f"backend URL {url!r} contains a space or control character")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as err:
        raise BackendURLError(f"malformed backend URL {url!r}: {err}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise BackendURLError(f"backend URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise BackendURLError(f"backend URL {url!r} has no host")
    if port is not None and not 1 <= port <= 65535:
        raise BackendURLError(f"backend URL {url!r}: port must be 1..65535")
    if not _valid_host(parts.hostname):
        raise BackendURLError(
            f"backend URL {url!r}: host {parts.hostname!r} is neither an IP address nor a "
            "DNS name (letters, digits, '-' and '.', labels of 1..63)"
        )
    if parts.username or parts.password:
        raise BackendURLError(f"backend URL {url!r} must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BackendURLError(f"backend URL {url!r} must be an origin (no path, query or #)")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme
    return f"{scheme}://{host}:{DEFAULT_PORTS[scheme] if port is None else port}"


@dataclass(slots=True)
class UpstreamResponse:
    """A complete answer from one backend; `noted`: it has one of NOTED_HEADERS."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    noted: bool = False


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight.

    The try's deadline is watched by its pool (`BackendPool._watch`), which keeps one
    timer for all its connections instead of one per try.
    """

    __slots__ = (
        "_loop",
        "transport",
        "_parser",
        "_waiter",
        "deadline",
        "_status",
        "_headers",
        "_body",
        "_head_only",
        "_complete",
        "_limits",
        "_max_headers",
        "_budget",
        "_noted",
        "_refused",
        "_head_bytes",
        "_body_bytes",
        "_in_head",
        "reusable",
        "closed",
        "_pool",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: BackendPool) -> None:
        self._loop = loop
        self._limits = pool.limits
        self._max_headers = pool.limits.max_headers
        self._budget = pool.budget
        # Watches the deadline, and keeps the connection when an answer ends it in step.
        self._pool = pool
        self.deadline = 0.0
        self._head_bytes = 0
        self._body_bytes = 0
        self._in_head = True
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        # The body as it arrives: its first piece, then one growing buffer (never one
        # object per piece: an answer in 2-byte chunks would cost 28 times its size).
        self._body: bytes | bytearray = b""
        self._noted = False
        self._refused: str | None = None  # why a callback stopped the parser
        self._head_only = False
        self._complete = False
        self.reusable = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for: the connection is out of step, never reuse it.
            self._abort()
            return
        if self._in_head:
            # Counted as bytes arrive: the parser would buffer a header line without end.
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectError("backend tried to upgrade the connection"))
        except httptools.HttpParserError as err:
            if self._refused is _OVER_BUDGET:
                self._fail(UpstreamOverBudget(self._budget.refusal()))  # type: ignore[union-attr]
            elif len(self._headers) >= self._limits.max_headers and self._in_head:
                self._fail(UpstreamTooLarge(f"answer over {self._limits.max_headers} headers"))
            elif self._refused is _TOO_LARGE:
                self._fail(
                    UpstreamTooLarge(f"answer body over {self._limits.max_body_bytes} bytes")
                )
            else:
                self._fail(UpstreamConnectError(f"malformed answer from backend: {err}"))
            return
        if self._in_head and self._head_bytes > self._limits.max_head_bytes:
            self._fail(UpstreamTooLarge(f"answer head over {self._limits.max_head_bytes} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            if self._status and not self._complete and not self._framed():
                # An answer delimited by the end of the connection (no length, not chunked).
                self._finish()
            else:
                self._fail(UpstreamConnectError("backend closed the connection"))

    def _framed(self) -> bool:
        """Whether the answer says where it ends (a length, or chunked)."""
        return any(n == b"content-length" or n == b"transfer-encoding" for n, _ in self._headers)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self._max_headers:
            raise ValueError("too many headers")  # the parser raises HttpParserError
        name = name.lower()
        headers.append((name, value))
        if name in NOTED_HEADERS:
            self._noted = True
        elif name == b"content-length" and not self._head_only and _over(value, self._limits):
            # Refused on its Content-Length, before a byte of the body is read: a node that
            # announces 500 MB costs the loop nothing more than its head.
            self._refused = _TOO_LARGE
            raise ValueError("body too large")  # the parser raises HttpParserError

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._status = self._parser.get_status_code()
        if self._head_only:
            # A HEAD answer has no body whatever its Content-Length says; the parser does not
            # know the request was HEAD, so finish here and let the connection go.
            self._finish(reuse=False)

    def on_body(self, body: bytes) -> None:
        n = len(body)
        size = self._body_bytes + n
        if size > self._limits.max_body_bytes:
            self._refused = _TOO_LARGE
            raise ValueError("body too large")  # the parser raises HttpParserError
        if self._budget is not None and not self._budget.take(n, size):
            self._refused = _OVER_BUDGET
            raise ValueError("over the memory budget")
        self._body_bytes = size
        self._body = grow(self._body, body)

    def on_message_complete(self) -> None:
        if not self._complete:
            self._finish(reuse=self._parser.should_keep_alive())

    # internals
    def _settle(self) -> asyncio.Future[UpstreamResponse] | None:
        """End the exchange in flight: stop watching its deadline and hand over its waiter,
        if the caller still waits."""
        self._pool._waiting.discard(self)
        waiter = self._waiter
        self._waiter = None
        return waiter if waiter is not None and not waiter.done() else None

    def _release(self) -> None:
        """Give the body's charge back to the budget (once)."""
        if self._budget is not None and self._body_bytes > 0:
            self._budget.used -= self._body_bytes
        self._body_bytes = 0

    def _finish(self, reuse: bool = False) -> None:
        self._complete = True
        waiter = self._settle()
        self.reusable = reuse and not self.closed and waiter is not None
        body = self._body
        self._body = b""
        self._release()
        if waiter is not None:
            if type(body) is bytearray:
                body = bytes(body)
            waiter.set_result(UpstreamResponse(self._status, self._headers, body, self._noted))
        if not self.reusable:
            self._abort()
        else:
            self._pool._release(self)

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        self._body = b""
        self._release()
        waiter = self._settle()
        if waiter is not None:
            waiter.set_exception(exc)
        self._abort()

    def _on_timeout(self) -> None:
        self._fail(UpstreamTimeout("no answer within the try timeout"))

    def _abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def send(
        self, request: bytes | tuple[bytes, bytes], head_only: bool, deadline: float
    ) -> asyncio.Future:
        """Write one request (whole, or head and a large body); the returned future
        resolves to its answer or fails."""
        self._status = 0
        self._headers = []
        self._body = b""
        self._noted = False
        self._refused = None
        self._complete = False
        self._head_bytes = 0
        self._body_bytes = 0
        self._in_head = True
        self._head_only = head_only
        self.reusable = False
        waiter = self._loop.create_future()
        self._waiter = waiter
        self.deadline = deadline
        self._pool._watch(self)
        if type(request) is bytes:
            self.transport.write(request)  # type: ignore[union-attr]
        else:
            self.transport.writelines(request)  # type: ignore[union-attr]
        return waiter

    def cancel(self) -> None:
        """The caller gave up (e.g. its task was cancelled): drop the connection."""
        self._fail(UpstreamConnectError("try cancelled"))


#: Methods whose requests go without a Content-Length when they have no body.
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


#: Request bodies up to this size are joined with the head into one write.
_JOINED_BODY_BYTES = 64 * 1024

#: How early a try's deadline may be declared passed (the event loop's timer resolution).
DEADLINE_RESOLUTION_S = 0.001


class BackendPool:
    """Idle keep-alive connections to one backend, reused last-in first-out; answers are
    charged to `budget` when one is given (the health and gossip pools, capped small, go
    without)."""

    def __init__(
        self,
        url: str,
        limits: UpstreamLimits,
        max_idle: int = 128,
        budget: MemoryBudget | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.limits = limits
        self.budget = budget
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
        # https:// backends: TLS, the certificate verified against the URL's host.
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.tls = tls if tls is not None else ssl.create_default_context()
        self.host_header = parts.netloc.encode("latin-1")
        self.max_idle = max_idle
        self._idle: deque[_Connection] = deque()
        self._closed = False
        # Connections with a try in flight, and one timer at the earliest of their
        # deadlines (a timer per try cost about 3 us a request: docs/DESIGN.md).
        self._waiting: set[_Connection] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        try:
            async with asyncio.timeout_at(deadline):
                if self.tls is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self), self.host, self.port
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self),
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=self.host,
                    )
        except TimeoutError:
            raise UpstreamTimeout("connect did not finish within the try timeout") from None
        except ssl.SSLError as err:  # an OSError: a certificate refused, a bad handshake
            raise UpstreamConnectError(f"TLS to the backend failed: {err}") from None
        except OSError as err:
            raise UpstreamConnectError(f"cannot connect: {err.strerror or err}") from None
        return conn

    def _acquire_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _watch(self, conn: _Connection) -> None:
        """Watch a try's deadline: arm the pool's timer if it is the earliest."""
        self._waiting.add(conn)
        if conn.deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = conn.deadline
            self._timer = conn._loop.call_at(conn.deadline, self._expire, conn._loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The earliest deadline passed: fail every try past its own, re-arm for the rest."""
        self._timer, self._timer_at = None, math.inf
        # Timers fire at millisecond resolution: a deadline within it has passed.
        now = loop.time() + DEADLINE_RESOLUTION_S
        for conn in [c for c in self._waiting if c.deadline <= now]:
            conn._on_timeout()
        if self._waiting:
            earliest = min(self._waiting, key=attrgetter("deadline"))
            self._timer_at = earliest.deadline
            self._timer = loop.call_at(earliest.deadline, self._expire, loop)

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn._abort()

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float,
    ) -> UpstreamResponse:
        """Send one request and return the whole answer; raise UpstreamError without one.

        `headers` must already lack hop-by-hop headers, Host and Content-Length.
        """
        if self._closed:
            raise UpstreamConnectError("backend was removed")
        conn = self._acquire_idle()
        fresh = conn is None
        # A kept connection knows its loop: get_running_loop() costs a getpid() system
        # call on Python 3.11, once per request.
        loop = asyncio.get_running_loop() if conn is None else conn._loop
        deadline = loop.time() + timeout
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", self.host_header]
        for name, value in headers:
            parts += (b"\r\n", name, b": ", value)
        if body or method not in _BODYLESS_METHODS:
            parts += (b"\r\ncontent-length: ", b"%d" % len(body))
        parts.append(b"\r\n\r\n")
        raw: bytes | tuple[bytes, bytes]
        if len(body) > _JOINED_BODY_BYTES:
            # A large body goes out as a second buffer: not copied into each try's request.
            raw = (b"".join(parts), body)
        else:
            if body:
                parts.append(body)
            raw = b"".join(parts)
        head_only = method == "HEAD"
        while True:
            if conn is None:
                conn = await self._connect(loop, deadline)
            try:
                # The connection goes back to the pool itself when the answer ends in step.
                return await conn.send(raw, head_only, deadline)
            except asyncio.CancelledError:
                conn.cancel()
                raise
            except (UpstreamTooLarge, UpstreamOverBudget):
                raise
            except UpstreamConnectError:
                # A kept-alive connection the backend had already closed (a race every
                # keep-alive client meets): one fresh connection within the same deadline,
                # for idempotent methods only (a POST may have been applied; as aiohttp).
                if fresh or loop.time() >= deadline or method not in IDEMPOTENT_METHODS:
                    raise
            conn, fresh = None, True

    def close(self) -> None:
        """Close every idle connection; requests in flight finish on their own."""
        self._closed = True
        while self._idle:
            self._idle.pop()._abort()
