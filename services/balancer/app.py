"""The balancer service: the proxy hot path and the wiring of core, API and server.

`create_app(settings)` returns a `BalancerApp` around a new `Balancer` (`core.py`);
`serve(app, host, port)` runs it on the HTTP/1.1 server of `http_server.py`. Every path
and method is proxied by `BalancerApp.forward` to a backend the policy picks, through
the lean keep-alive pool of `upstream.py`; the balancer's own paths (`/healthz`,
`/metrics`, `/trust`, `/admin/...`, see `settings.RESERVED_PATHS`) go to the FastAPI app
of `api.py` through a minimal ASGI bridge, and that app's lifespan starts and stops the
balancer's background loops around the listening time. Two apps in one process share
nothing.

Between client and backend the balancer is one hop (RFC 9110 7.6): hop-by-hop headers,
and those a Connection header names, are dropped both ways; it writes the `Forwarded`
(RFC 7239) and `X-Forwarded-For` headers itself, keeping and extending a client's own
only when the client is a proxy it was told to trust (`--trusted-proxy`); a backend's
`Location` into the fleet becomes a path on the balancer; backend addresses reach a
client only with `--backend-header`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import resource
import signal
import socket
from collections.abc import Awaitable, Container, Iterable, MutableMapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote

from twlb.balancer import tls
from twlb.balancer.access import AccessLog, Tracing, request_id
from twlb.balancer.api import build_api
from twlb.balancer.audit import AUDITED_METHODS, AuditResult, answer_digest
from twlb.balancer.core import Balancer, TryResult
from twlb.balancer.http_server import (
    HttpServer,
    Reply,
    ServerLimits,
    json_reply,
)
from twlb.balancer.memory import MemoryBudget
from twlb.balancer.oracle import OracleTruthError, load_oracle_truth
from twlb.balancer.replicas import Replicas
from twlb.balancer.settings import (
    ADMIN_PREFIX,
    IDEMPOTENT_METHODS,
    RESERVED_PATHS,
    BalancerSettings,
)
from twlb.balancer.upstream import (
    REQUEST_DROPPED,
    RESPONSE_DROPPED,
    BackendURLError,
    UpstreamResponse,
    normalize_backend_url,
)

from twlb.outcome import Outcome
from twlb.tokens import Token

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

#: Forwarding headers: kept (and extended) only from a trusted proxy, else replaced by
#: the balancer's own `Forwarded` and `X-Forwarded-For`.
FORWARDING: frozenset[bytes] = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
)

#: W3C trace context: passed on as it came, unless the balancer's own span takes its place.
TRACE_CONTEXT: frozenset[bytes] = frozenset({b"traceparent", b"tracestate"})

#: Request headers `forward` does not pass on as they are (one look-up per header).
_SPECIAL = REQUEST_DROPPED | FORWARDING | TRACE_CONTEXT | {b"x-request-id"}


def audit_word(verdict: AuditResult) -> str:
    """An audit's verdict in the access log: agreed, mismatch or no_quorum."""
    if not verdict.quorum_met:
        return "no_quorum"
    return "mismatch" if verdict.odd else "agreed"


def upstream_reply(
    backend: str,
    response: UpstreamResponse,
    method: str,
    named: bool = False,
    fleet: Container[str] = (),
) -> Reply:
    """A backend's answer as the client gets it: hop-by-hop headers (and those its
    Connection header names) dropped, a Location into `fleet` made a path on the
    balancer, length set, the backend named when `named`."""
    status_code = response.status
    if method == "HEAD" or status_code == 304:
        # No body follows; the length the backend declared (that of the full answer) stays.
        headers = [h for h in response.headers if h[0] not in BODYLESS_DROPPED]
        if response.noted:
            headers = _noted(response.headers, headers, fleet)
    else:
        headers = [h for h in response.headers if h[0] not in RESPONSE_DROPPED]
        if response.noted:
            headers = _noted(response.headers, headers, fleet)
        if status_code != 204:
            headers.append((b"content-length", b"%d" % len(response.body)))
    if named:
        headers.append(_backend_header(backend))
    return Reply(status_code, headers, response.body)


def _noted(
    received: list[tuple[bytes, bytes]], kept: list[tuple[bytes, bytes]], fleet: Container[str]
) -> list[tuple[bytes, bytes]]:
    """The slow path of an answer with a Connection, Location or Content-Location header."""
    listed: set[bytes] = set()
    for name, value in received:
        if name == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
    out = []
    for name, value in kept:
        if name in listed:
            continue  # named by the backend's Connection header: this hop only
        if name == b"location" or name == b"content-location":
            value = _balancer_location(value, fleet)
        out.append((name, value))
    return out


def _balancer_location(value: bytes, fleet: Container[str]) -> bytes:
    """A Location (or Content-Location) pointing at a backend of the fleet, as a path on
    the balancer (a relative reference, which the client resolves against the balancer's
    address it asked); any other value as it is."""
    scheme = value[:8].lower()
    if scheme.startswith(b"http://"):
        scheme, rest = "http://", value[7:]
    elif scheme == b"https://":
        scheme, rest = "https://", value[8:]
    else:
        return value
    end = len(rest)
    for sep in (b"/", b"?", b"#"):
        at = rest.find(sep)
        if 0 <= at < end:
            end = at
    try:
        origin = normalize_backend_url(scheme + rest[:end].decode("latin-1"))
    except BackendURLError:
        return value
    if origin not in fleet:
        return value
    path = rest[end:]
    return path if path[:1] == b"/" else b"/" + path


@functools.lru_cache(maxsize=4096)
def _client_node(client_host: str | None) -> tuple[bytes, bytes]:
    """A client address as X-Forwarded-For's item and as Forwarded's `for=` parameter."""
    if not client_host:
        return b"unknown", b"for=unknown"
    address = client_host.encode("latin-1")
    if ":" in client_host:  # IPv6: bracketed and quoted (RFC 7239 section 6)
        return address, b'for="[' + address + b']"'
    return address, b"for=" + address


def _host_and_proto(host: bytes, https: bool = False) -> bytes:
    """Forwarded's `host` and `proto` parameters for a request's Host header (the few
    short Host values clients send are remembered; a long one, which only a hostile
    client sends, is not)."""
    return _host_param(host, https) if len(host) <= 255 else _quoted_host(host, https)


def _quoted_host(host: bytes, https: bool = False) -> bytes:
    proto = b";proto=https" if https else b";proto=http"
    if not host:
        return proto
    quoted = host.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b';host="' + quoted + b'"' + proto


_host_param = functools.lru_cache(maxsize=256)(_quoted_host)


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
        # The admin token, from --admin-token or its file (re-read when it changes).
        self.token = Token(settings.admin_token, settings.admin_token_file)
        # Evidence shared with peer replicas and kept in a file across runs.
        self.replicas: Replicas | None = None
        if settings.shares_evidence or settings.evidence_file is not None:
            self.replicas = Replicas(self.balancer, self.token)
        self.api = build_api(self.balancer, self.token, self.replicas)
        self._max_body = settings.max_body_bytes
        self.limits: ServerLimits = settings.server_limits
        self.budget = self.balancer.memory
        self._named = settings.backend_header
        self._trusted = tuple(ipaddress.ip_network(n) for n in settings.trusted_proxies)
        self._trusts = functools.lru_cache(maxsize=4096)(self._is_trusted)
        # With an admin listener of its own, the traffic port proxies every path.
        self.proxy_all = settings.admin_apart
        self._https = settings.tls_cert_file is not None
        self.access = AccessLog(settings.access_log_sample, settings.seed, settings.replica_id)
        self._logged = settings.access_log_sample > 0.0
        self.tracing: Tracing | None = None
        if Tracing.configured():
            self.tracing = Tracing("twlb-balancer", settings.replica_id)

    def _is_trusted(self, client_host: str | None) -> bool:
        """Whether a peer is one of the configured trusted proxies."""
        if not client_host:
            return False
        try:
            address = ipaddress.ip_address(client_host)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    @staticmethod
    def is_own_path(path: str) -> bool:
        """True for the balancer's reserved paths, which are never proxied."""
        return path in RESERVED_PATHS or path.startswith(ADMIN_PREFIX)

    def too_large(self) -> Reply:
        """The 413 answer to a body over --max-body-bytes (counted)."""
        self.balancer.metrics.requests["too_large"] += 1
        return json_reply(413, f"request body over the limit of {self._max_body} bytes")

    def over_budget(self, why: str) -> Reply:
        """The 503 answer to a request the memory budget has no room for (counted)."""
        self.balancer.metrics.requests["over_budget"] += 1
        return json_reply(503, why)

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
        logged = self._logged and self.access.sampled()
        started = self.access.start() if logged else None
        forwarded: list[tuple[bytes, bytes]] = []
        key: str | None = None
        quorum_header: bytes | None = None
        listed: set[bytes] | None = None
        host = b""
        rid: bytes | None = None
        trace: dict[str, str] | None = None
        # The forwarding chains a trusted proxy sent; from anyone else they are dropped.
        trusted = bool(self._trusted) and self._trusts(client_host)
        chain: list[bytes] = []
        elements: list[bytes] = []
        for header in headers:
            name, value = header
            if name in _SPECIAL:
                if name == b"host":
                    host = value
                elif name == b"x-request-id":
                    rid = value
                elif name in TRACE_CONTEXT:
                    if trace is None:
                        trace = {}
                    trace[name.decode("latin-1")] = value.decode("latin-1")
                elif name == b"connection":
                    if listed is None:
                        listed = set()
                    listed.update(t.strip().lower() for t in value.split(b","))
                elif trusted and name in FORWARDING:
                    if name == b"x-forwarded-for":
                        chain.append(value)
                    elif name == b"forwarded":
                        elements.append(value)
                    else:
                        forwarded.append(header)
                continue
            if name[:7] == b"x-twlb-":
                # The balancer's own control headers are read here and never leak upstream.
                if name == b"x-twlb-key":
                    key = value.decode("latin-1")
                elif name == b"x-twlb-quorum":
                    quorum_header = value
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
            if b"forwarded" in listed:
                elements.clear()
            if b"x-twlb-key" in listed:
                key = None
            if b"x-twlb-quorum" in listed:
                quorum_header = None
        # This hop appended to the chains (as nginx's $proxy_add_x_forwarded_for).
        address, node = _client_node(client_host)
        element = node + _host_and_proto(host, self._https)
        if chain:
            chain.append(address)
            address = b", ".join(chain)
        if elements:
            elements.append(element)
            element = b", ".join(elements)
        forwarded.append((b"x-forwarded-for", address))
        forwarded.append((b"forwarded", element))
        rid = request_id(rid)
        forwarded.append((b"x-request-id", rid))
        span = None
        tracing = self.tracing
        if tracing is not None:
            span = tracing.start(method, raw_path, trace or {})
            forwarded += tracing.headers(span)
        elif trace:  # not a participant: the client's trace context goes on as it came
            forwarded += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trace.items()]

        target = raw_path
        if query:
            target = target + b"?" + query
            if key is None and balancer.wants_key and query.find(b"key=") >= 0:
                key = next((v for k, v in parse_qsl(query.decode("latin-1")) if k == "key"), None)

        if quorum_header is not None:
            reply = await self._quorum(balancer, method, target, forwarded, body, quorum_header)
            result = None
            deferred = False
        else:
            result, why = await balancer.route(method, target, forwarded, body, key)
            reply, deferred = self._reply(
                balancer, method, target, forwarded, result, why, started, rid, raw_path
            )
        reply.headers.append((b"x-request-id", rid))
        backend, tries = (result.backend, result.tries) if result is not None else (None, 0)
        if span is not None:
            tracing.end(span, reply.status, backend, tries)  # type: ignore[union-attr]
        if started is not None and not deferred:
            self.access.write(started, rid, method, raw_path, reply.status, backend, tries, None)
        return reply

    def _reply(
        self,
        balancer: Balancer,
        method: str,
        target: bytes,
        forwarded: list,
        result: TryResult | None,
        why: str,
        started: tuple[float, float] | None,
        rid: bytes,
        path: bytes,
    ) -> tuple[Reply, bool]:
        """The answer to a routed request; a 2xx one may be audited once it is on its way,
        and then its access log line (when `started`: sampled) waits for the verdict
        (True: deferred so)."""
        outcomes = balancer.metrics.requests
        if result is None:
            outcomes["no_backend"] += 1
            return json_reply(503, why), False
        response = result.response
        if response is None:
            return self._no_answer(result, outcomes), False
        status = response.status
        outcomes["error" if status >= 500 else "success"] += 1
        deferred = False
        if 200 <= status < 300:
            on_verdict = None
            if started is not None:
                access, backend, tries = self.access, result.backend, result.tries

                def on_verdict(verdict: AuditResult) -> None:
                    access.write(
                        started, rid, method, path, status, backend, tries, audit_word(verdict),
                        odd=verdict.odd or None,
                    )  # fmt: skip

            # Only spawns the audit task: it runs after this answer is on its way.
            deferred = balancer.maybe_audit(method, target, forwarded, result, on_verdict)
            deferred = deferred and started is not None
        reply = upstream_reply(
            result.backend, response, method, self._named, balancer.fleet.records
        )
        return reply, deferred

    def _no_answer(self, result: TryResult, outcomes: dict[str, int]) -> Reply:
        """The error answer to a request whose last try got no answer."""
        if result.over_budget:  # given up by the balancer: its memory budget
            outcomes["over_budget"] += 1
            return json_reply(503, result.detail)
        outcomes["failed"] += 1
        named = {"backend": result.backend} if self._named else {}
        who = f"backend {result.backend}" if self._named else "the backend"
        if result.outcome is Outcome.TIMEOUT:
            return json_reply(504, f"{who} did not answer in time", **named)
        why = result.detail or "could not be reached"
        return json_reply(502, f"{who}: {why}", **named)

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
        return upstream_reply(
            result.backend, result.response, method, self._named, balancer.fleet.records
        )

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
        coroutine is returned, not awaited here: one frame less on the proxy path). With
        an admin listener apart (`proxy_all`), every path is proxied."""
        if self.proxy_all:
            return self.forward(method, path, query, headers, client[0] if client else None, body)
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


class AdminHandler:
    """The admin listener's requests: the balancer's own endpoints (`/admin/*`, `/trust`,
    `/metrics`, `/readyz`, `/healthz`); any other path is 404 (nothing is proxied here)."""

    def __init__(self, app: BalancerApp) -> None:
        self.app = app
        self.limits = replace(app.limits, max_body_bytes=ADMIN_MAX_BODY, max_connections=256)

    def handle(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        body: bytes,
    ) -> Awaitable[Reply] | Reply:
        if self.app.is_own_path(unquote(path.decode("latin-1"))):
            return self.app.call_api(method, path, query, headers, client, server, body)
        return json_reply(
            404, "not an endpoint of the admin listener: traffic goes to the traffic port"
        )

    def too_large(self) -> Reply:
        return json_reply(413, f"request body over the admin listener's {ADMIN_MAX_BODY} bytes")

    def over_budget(self, why: str) -> Reply:
        return json_reply(503, why)


#: Largest request body the admin listener reads (an evidence exchange among replicas).
ADMIN_MAX_BODY = 2 << 20
#: Bytes the admin listener may hold in flight, apart from the traffic's budget.
ADMIN_BUDGET = 32 << 20


async def serve(app: BalancerApp, host: str, port: int) -> int | None:
    """Run the balancer until SIGTERM or SIGINT; returns that signal's number.

    In order: the loops start (the FastAPI lifespan), the admin listener opens (with
    `--admin-port`), the evidence of the last run and of peer replicas is taken in
    (replicas.py; `/readyz` answers 503 meanwhile), then the traffic listener opens on
    host:port, or on the inherited `--listen-fd` socket, with TLS when configured. On
    the signal the balancer drains: `/readyz` answers 503, the traffic listener closes,
    and for `--drain-s` the requests in flight, queued and arriving on open connections
    are still served (each answer closing its connection); then the rest get 503.
    """
    settings = app.settings
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    balancer = app.balancer
    async with app.api.router.lifespan_context(app.api):
        open_files_for(app.limits.max_connections)
        admin = None
        if settings.admin_apart:
            handler = AdminHandler(app)
            admin = HttpServer(handler, handler.limits, MemoryBudget(ADMIN_BUDGET))
            await admin.start(settings.admin_host, settings.admin_port or 0)
            log.info("admin listener on http://%s:%d", *(admin.sockname or ("?", 0)))
        replicas = app.replicas
        if replicas is not None:
            await replicas.warm_up()
        server = HttpServer(app, app.limits, app.budget, balancer.metrics.observe_answer)
        balancer.metrics.server = server
        inherited = None
        if settings.listen_fd is not None:
            inherited = socket.socket(fileno=settings.listen_fd)
        await server.start(host, port, sock=inherited, ssl=tls.server_context(settings))
        scheme = "https" if settings.tls_cert_file is not None else "http"
        log.info("balancer listening on %s://%s:%d", scheme, *(server.sockname or (host, port)))
        await stop.wait()
        balancer.draining = True
        log.info("balancer draining for up to %.1f s", settings.drain_s)
        await server.stop(grace_s=settings.drain_s)
        log.info("balancer shutting down")
        if replicas is not None:
            replicas.save()
        if admin is not None:
            await admin.stop(grace_s=0.5)
    if app.tracing is not None:
        await asyncio.to_thread(app.tracing.shutdown)
    return received[0] if received else None


def open_files_for(connections: int) -> None:
    """Raise this process's open-file limit (up to its hard limit) to what `connections`
    clients need: one descriptor each, one for its upstream connection, and room for the
    pools and health checks; warn when the hard limit is lower."""
    wanted = 2 * connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "open files limited to %d (hard limit): fewer than %d client connections can "
            "be served with their upstream connections",
            target,
            connections,
        )


def create_app(settings: BalancerSettings, **core: Any) -> BalancerApp:
    """A new balancer app; nothing is opened until its lifespan starts.

    The `Balancer` is built here, so a bad oracle truth file (OracleTruthError) or a
    refused model (ModelRefused) stops start-up now, not on the first tick; each is read
    once. `core` reaches the `Balancer` (clock, transports, fleet_settled).
    """
    return BalancerApp(settings, **core)
