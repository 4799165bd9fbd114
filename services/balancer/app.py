"""The balancer service: the proxy hot path and the wiring of core, API and server.

`create_app(settings)` returns a `BalancerApp` around a new `Balancer` (`core.py`);
`serve(app, host, port)` runs it on the HTTP/1.1 server of `http_server.py`. Every path
and method is proxied by `BalancerApp.forward` to a backend the policy picks, through
the lean keep-alive pool of `upstream.py`; the balancer's own paths (`/healthz`,
`/metrics`, `/trust`, `/admin/...`, see `settings.RESERVED_PATHS`) go to the FastAPI app
of `api.py` through a minimal ASGI bridge, and that app's lifespan starts and stops the
balancer's background loops around the listening time. Two apps in one process share
nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote

from twlb.balancer.api import build_api
from twlb.balancer.audit import AUDITED_METHODS, answer_digest
from twlb.balancer.core import Balancer, TryResult
from twlb.balancer.http_server import (
    HttpServer,
    Reply,
    ServerLimits,
    json_reply,
)
from twlb.balancer.oracle import OracleTruthError, load_oracle_truth
from twlb.balancer.settings import (
    ADMIN_PREFIX,
    IDEMPOTENT_METHODS,
    RESERVED_PATHS,
    BalancerSettings,
)
from twlb.balancer.upstream import REQUEST_DROPPED, RESPONSE_DROPPED, UpstreamResponse

from twlb.outcome import Outcome

log = logging.getLogger("twlb.balancer")

__all__ = [
    "AUDITED_METHODS",
    "Balancer",
    "BalancerApp",
    "OracleTruthError",
    "TryResult",
    "answer_digest",
    "create_app",
    "load_oracle_truth",
    "serve",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


#: Largest quorum a request may ask for (`X-TWLB-Quorum`).
MAX_QUORUM = 5

#: Response headers dropped when no body follows (HEAD, 304): Content-Length stays.
BODYLESS_DROPPED = RESPONSE_DROPPED - {b"content-length"}


def upstream_reply(backend: str, response: UpstreamResponse, method: str) -> Reply:
    """A backend's answer as the client gets it: hop-by-hop headers dropped, length set."""
    status_code = response.status
    if method == "HEAD" or status_code == 304:
        # No body follows; the length the backend declared (that of the full answer) stays.
        headers = [h for h in response.headers if h[0] not in BODYLESS_DROPPED]
    else:
        headers = [h for h in response.headers if h[0] not in RESPONSE_DROPPED]
        if status_code != 204:
            headers.append((b"content-length", b"%d" % len(response.body)))
    headers.append(_backend_header(backend))
    return Reply(status_code, headers, response.body)


@functools.lru_cache(maxsize=4096)
def _backend_header(backend: str) -> tuple[bytes, bytes]:
    """The `X-TWLB-Backend` header naming the backend that answered."""
    return (b"x-twlb-backend", backend.encode("latin-1"))


class BalancerApp:
    """The balancer's request handling: own endpoints through FastAPI, the rest proxied.

    `forward` is the proxy hot path and `call_api` the bridge to the FastAPI app; the
    HTTP server below (`serve`) calls one or the other for each request.
    """

    def __init__(self, settings: BalancerSettings, **core: Any) -> None:
        self.settings = settings
        # `core` reaches the Balancer as is (clock, transport, health_transport): tests
        # drive the whole request path in memory with a fake upstream.
        self.balancer = Balancer(settings, **core)
        self.api = build_api(self.balancer)
        self._max_body = settings.max_body_bytes
        self.limits = ServerLimits(
            max_body_bytes=settings.max_body_bytes,
            max_head_bytes=settings.max_head_bytes,
            max_headers=settings.max_request_headers,
            head_timeout_s=settings.head_timeout_s,
            max_connections=settings.max_connections,
        )

    @staticmethod
    def is_own_path(path: str) -> bool:
        """True for the balancer's reserved paths, which are never proxied."""
        return path in RESERVED_PATHS or path.startswith(ADMIN_PREFIX)

    def too_large(self) -> Reply:
        """The 413 answer to a body over --max-body-bytes (counted)."""
        self.balancer.metrics.requests["too_large"] += 1
        return json_reply(413, f"request body over the limit of {self._max_body} bytes")

    async def forward(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        client_host: str | None,
        body: bytes,
    ) -> Reply:
        """The hot path: filter headers, route with retries, answer, maybe audit.

        `headers` have lower-case names; the body is complete and within the limit.
        """
        balancer = self.balancer
        forwarded: list[tuple[bytes, bytes]] = []
        key: str | None = None
        quorum_header: bytes | None = None
        listed: set[bytes] | None = None
        chain: list[bytes] = []
        for header in headers:
            name, value = header
            if name in REQUEST_DROPPED:
                if name == b"connection":
                    if listed is None:
                        listed = set()
                    listed.update(t.strip().lower() for t in value.split(b","))
                continue
            if name[:7] == b"x-twlb-":
                # The balancer's own control headers are read here and never leak upstream.
                if name == b"x-twlb-key":
                    key = value.decode("latin-1")
                elif name == b"x-twlb-quorum":
                    quorum_header = value
                continue
            if name == b"x-forwarded-for":
                chain.append(value)
                continue
            forwarded.append(header)
        if listed is not None:
            listed -= REQUEST_DROPPED
            listed.discard(b"")
        if listed:
            # Headers the client named in Connection belong to this hop only (RFC 9110
            # 7.6.1): never forwarded, whatever their name. Usually it names only
            # keep-alive or close, and this second pass is skipped.
            forwarded = [(n, v) for n, v in forwarded if n not in listed]
            if b"x-forwarded-for" in listed:
                chain.clear()
            if b"x-twlb-key" in listed:
                key = None
            if b"x-twlb-quorum" in listed:
                quorum_header = None
        if client_host:
            chain.append(client_host.encode("latin-1"))
        if chain:
            # The client's own chain, with its address appended (as nginx's
            # $proxy_add_x_forwarded_for).
            forwarded.append((b"x-forwarded-for", b", ".join(chain)))

        target = raw_path
        if query:
            target = target + b"?" + query
            if key is None and balancer.wants_key and query.find(b"key=") >= 0:
                key = next((v for k, v in parse_qsl(query.decode("latin-1")) if k == "key"), None)

        if quorum_header is not None:
            return await self._quorum(balancer, method, target, forwarded, body, quorum_header)

        result, why = await balancer.route(method, target, forwarded, body, key)
        outcomes = balancer.metrics.requests
        if result is None:
            outcomes["no_backend"] += 1
            return json_reply(503, why)
        response = result.response
        if response is None:
            outcomes["failed"] += 1
            if result.outcome is Outcome.TIMEOUT:
                return json_reply(
                    504, f"backend {result.backend} did not answer in time", backend=result.backend
                )
            why = result.detail or "could not be reached"
            return json_reply(502, f"backend {result.backend}: {why}", backend=result.backend)
        outcomes["error" if response.status >= 500 else "success"] += 1
        if 200 <= response.status < 300:
            # Only spawns the audit task: it runs after this answer is on its way.
            balancer.maybe_audit(method, target, forwarded, result)
        return upstream_reply(result.backend, response, method)

    async def _quorum(
        self,
        balancer: Balancer,
        method: str,
        target: bytes,
        headers: list,
        body: bytes,
        raw: bytes,
    ) -> Reply:
        try:
            quorum = int(raw)
        except ValueError:
            quorum = 0
        if not 1 <= quorum <= MAX_QUORUM:
            balancer.metrics.requests["bad_request"] += 1
            return json_reply(400, f"X-TWLB-Quorum must be an integer 1..{MAX_QUORUM}")
        if method not in IDEMPOTENT_METHODS:
            balancer.metrics.requests["bad_request"] += 1
            return json_reply(400, f"quorum reads need an idempotent method, not {method}")
        result, why = await balancer.quorum_read(method, target, headers, body, quorum)
        if result is None or result.response is None:
            balancer.metrics.requests["quorum_failed"] += 1
            return json_reply(502, why or "no answer")
        balancer.metrics.requests["success"] += 1
        return upstream_reply(result.backend, result.response, method)

    def handle(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        body: bytes,
    ) -> Awaitable[Reply]:
        """The server's entry point: own paths to the API, everything else proxied (the
        coroutine is returned, not awaited here: one frame less on the proxy path)."""
        name = path.decode("latin-1")
        if path.find(b"%") >= 0:  # find(): `in` on bytes tries an int first
            name = unquote(name)
        if self.is_own_path(name):
            return self.call_api(method, path, query, headers, client, server, body)
        return self.forward(method, path, query, headers, client[0] if client else None, body)

    async def call_api(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        body: bytes,
    ) -> Reply:
        """One request to the FastAPI app of the own endpoints, answered as a whole."""
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": server,
            "client": client,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": {},
        }
        answered = asyncio.Event()
        request_sent = False
        start: Message = {}
        chunks: list[bytes] = []

        async def receive() -> Message:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    answered.set()

        try:
            await self.api(scope, receive, send)
        finally:
            answered.set()
        if not start:
            return json_reply(500, "the balancer's own endpoint gave no answer")
        payload = b"".join(chunks)
        out = [
            (n.lower(), v)
            for n, v in start.get("headers", ())
            if n.lower() not in (b"content-length", b"transfer-encoding", b"connection")
        ]
        if method != "HEAD":
            out.append((b"content-length", str(len(payload)).encode("ascii")))
        return Reply(start["status"], out, payload)


# -------------------------------------------------------------------- native HTTP server


async def serve(app: BalancerApp, host: str, port: int) -> int | None:
    """Run the balancer on host:port until SIGTERM or SIGINT; returns that signal's number.

    The FastAPI lifespan (which opens and closes the `Balancer`) wraps the listening time.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    async with app.api.router.lifespan_context(app.api):
        server = HttpServer(app, app.limits)
        await server.start(host, port)
        log.info("balancer listening on http://%s:%d", *(server.sockname or (host, port)))
        await stop.wait()
        log.info("balancer shutting down")
        await server.stop()
    return received[0] if received else None


def create_app(settings: BalancerSettings, **core: Any) -> BalancerApp:
    """A new balancer app; nothing is opened until its lifespan starts.

    The `Balancer` is built here, so a bad oracle truth file (OracleTruthError) or a
    refused model (ModelRefused) stops start-up now, not on the first tick; each is read
    once. `core` reaches the `Balancer` (clock, transports, fleet_settled).
    """
    return BalancerApp(settings, **core)
