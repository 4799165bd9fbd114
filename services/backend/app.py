"""The backend node's HTTP service: `create_app(settings)` builds one node as a FastAPI app.

`GET /work` does the work of docs/DESIGN.md ("The work") and lets the sans-IO cores
(`FaultInjector`, `NodeSimulation`) decide what goes wrong; this module only acts their
decisions out (sleeps, exits, drops connections, answers 5xx or a wrong digest) and
measures them.
/work is served as plain ASGI ahead of FastAPI, with a hand-parsed query and orjson
bodies: it is the hot path every benchmark and experiment drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import orjson
import psutil
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response
from twlb.backend.faults import NO_FAULT, FaultAction, FaultInjector
from twlb.backend.settings import BackendSettings
from twlb.backend.simulation import NodeSimulation
from twlb.gossip.service import GossipService

from twlb.plain_metrics import PlainHistogram
from twlb.spec import FaultSpec, FaultType
from twlb.tokens import Token
from twlb.work import KEY_MAX_LEN, KEY_MIN_LEN, ROUNDS_MAX, ROUNDS_MIN, digest, key_problem

log = logging.getLogger("twlb.backend")

#: Exit status of a node whose crash fault fired (EX_SOFTWARE).
CRASH_EXIT_STATUS = 70
WORK_PARAMS = ("key", "rounds")
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


_PROBLEMS_SCHEMA = {
    "type": "object",
    "required": ["error", "problems"],
    "properties": {
        "error": {"type": "string"},
        "problems": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

#: GET /work as the OpenAPI document describes it: the route bypasses FastAPI (see
#: BackendApp), which would otherwise leave it out of /openapi.json and out of reach of
#: schema-driven tests. Bounds come from the same constants `parse_work_query` checks.
WORK_OPENAPI: dict[str, Any] = {
    "get": {
        "summary": "The work: the digest of `key` after `rounds` rounds (docs/DESIGN.md)",
        "operationId": "work",
        "parameters": [
            {
                "name": "key",
                "in": "query",
                "required": True,
                "description": "Printable characters.",
                "schema": {"type": "string", "minLength": KEY_MIN_LEN, "maxLength": KEY_MAX_LEN},
            },
            {
                "name": "rounds",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": ROUNDS_MIN,
                    "maximum": ROUNDS_MAX,
                    "default": ROUNDS_MIN,
                },
            },
        ],
        "responses": {
            "200": {
                "description": "The answer (a byzantine fault answers a wrong digest).",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["node", "key", "rounds", "digest"],
                            "properties": {
                                "node": {"type": "string"},
                                "key": {"type": "string"},
                                "rounds": {"type": "integer"},
                                "digest": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "422": {
                "description": "An invalid query, every invalid field named.",
                "content": {"application/json": {"schema": _PROBLEMS_SCHEMA}},
            },
            "5XX": {"description": "An injected error fault (`error_status`)."},
        },
    }
}


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One invalid field of a request and what is wrong with it."""

    field: str
    message: str


def problems_body(what: str, problems: list[FieldProblem]) -> bytes:
    """The JSON of a 422 that names every invalid field."""
    summary = "; ".join(f"{p.field}: {p.message}" for p in problems)
    body = {
        "error": f"invalid {what}: {summary}",
        "problems": [{"field": p.field, "message": p.message} for p in problems],
    }
    return orjson.dumps(body)


def problems_response(what: str, problems: list[FieldProblem]) -> Response:
    """A 422 response that names every invalid field."""
    return Response(problems_body(what, problems), status_code=422, media_type="application/json")


class UndecodableQuery(ValueError):
    """A query parameter whose name or value is not UTF-8 once percent-decoded."""

    def __init__(self, name: str) -> None:
        super().__init__(f"query parameter {name!r} is not UTF-8")
        self.name = name


def _query_text(raw: bytes, name: str | None) -> str:
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        shown = name if name is not None else raw.decode("latin-1")
        raise UndecodableQuery(shown) from None


def query_pairs(query_string: bytes) -> list[tuple[str, str]]:
    """Name-value pairs as `parse_qsl(..., keep_blank_values=True, errors="strict")` gives
    them, without its cost on plain queries; a name or value that is not UTF-8 once
    percent-decoded raises `UndecodableQuery` (it is not replaced by U+FFFD)."""
    if b"%" not in query_string and b"+" not in query_string and query_string.isascii():
        text = query_string.decode("ascii")
        return [(n, v) for n, _, v in (p.partition("=") for p in text.split("&") if p)]
    pairs = []
    for part in query_string.split(b"&"):
        if part:
            raw_name, _, raw_value = part.partition(b"=")
            name = _query_text(raw_name, None)
            pairs.append((name, _query_text(raw_value, name)))
    return pairs


#: Longest `rounds` value converted to a number (ROUNDS_MAX has 5 digits); a longer run of
#: digits is out of range without being converted (int() of 5,000 digits raises).
_ROUNDS_MAX_DIGITS = 8


def parse_work_query(query_string: bytes) -> tuple[str, int] | list[FieldProblem]:
    """`(key, rounds)` of a /work query string, or the problems that make it invalid."""
    key: str | None = None
    raw_rounds: str | None = None
    problems: list[FieldProblem] = []
    try:
        pairs = query_pairs(query_string)
    except UndecodableQuery as err:
        return [FieldProblem(err.name, "is not valid UTF-8 once percent-decoded")]
    for name, value in pairs:
        if name == "key" and key is None:
            key = value
        elif name == "rounds" and raw_rounds is None:
            raw_rounds = value
        elif name in WORK_PARAMS:
            problems.append(FieldProblem(name, "given more than once"))
        else:
            allowed = ", ".join(WORK_PARAMS)
            problems.append(FieldProblem(name, f"unknown query parameter (allowed: {allowed})"))
    if key is None:
        problems.append(FieldProblem("key", "is required"))
    elif (why := key_problem(key)) is not None:
        problems.append(FieldProblem("key", why))
    rounds = ROUNDS_MIN
    if raw_rounds is not None:
        if raw_rounds.isascii() and raw_rounds.isdigit():
            digits = raw_rounds.lstrip("0") or "0"
            rounds = int(digits) if len(digits) <= _ROUNDS_MAX_DIGITS else ROUNDS_MAX + 1
            if not ROUNDS_MIN <= rounds <= ROUNDS_MAX:
                shown = raw_rounds if len(raw_rounds) <= 20 else f"{len(raw_rounds)} digits"
                problems.append(
                    FieldProblem("rounds", f"must be in {ROUNDS_MIN}..{ROUNDS_MAX}, got {shown}")
                )
        else:
            problems.append(FieldProblem("rounds", f"must be an integer, got {raw_rounds!r}"))
    if problems:
        return problems
    assert key is not None
    return key, rounds


class NodeMetrics(Collector):
    """The node's Prometheus metrics, in a registry of its own (one per app).

    What /work updates per request is kept as plain numbers (the event loop is one
    thread) and turned into metric families at scrape time; the gauges set on a scrape
    or a fault switch stay prometheus-client Gauges.
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.requests: dict[int, int] = {}  # answered work requests by HTTP status
        self.duration = PlainHistogram(LATENCY_BUCKETS_S)
        self.in_flight = 0
        self.dropped = 0
        self.registry = CollectorRegistry()
        reg = self.registry
        reg.register(self)
        self.cpu = Gauge(
            "twlb_node_cpu_utilization_ratio",
            "CPU utilisation of the node (simulated, or the process's own without simulation).",
            ["node"],
            registry=reg,
        ).labels(node=node_id)
        self.memory = Gauge(
            "twlb_node_memory_bytes",
            "Memory in use by the node (simulated, or the process's RSS without simulation).",
            ["node"],
            registry=reg,
        ).labels(node=node_id)
        self.network_latency = Gauge(
            "twlb_node_network_latency_seconds",
            "The node's simulated baseline network latency.",
            ["node"],
            registry=reg,
        ).labels(node=node_id)
        self._fault_info = Gauge(
            "twlb_node_fault_info",
            "1 for the fault the node reports as active, 0 for the others.",
            ["node", "type"],
            registry=reg,
        )

    def answered(self, code: int, duration_s: float) -> None:
        self.requests[code] = self.requests.get(code, 0) + 1
        self.duration.observe(duration_s if duration_s > 0.0 else 0.0)

    def report_fault(self, fault: FaultType) -> None:
        for t in FaultType:
            self._fault_info.labels(node=self.node_id, type=t.value).set(1 if t is fault else 0)

    def collect(self) -> Iterable[Metric]:
        node = [self.node_id]
        requests = CounterMetricFamily(
            "twlb_node_requests",
            "Work requests answered, by HTTP status code.",
            labels=["node", "code"],
        )
        for code, n in sorted(self.requests.items()):
            requests.add_metric([self.node_id, str(code)], n)
        duration = HistogramMetricFamily(
            "twlb_node_request_duration_seconds",
            "Time to answer a work request, as the node itself reports it.",
            labels=["node"],
        )
        duration.add_metric(node, self.duration.cumulative_buckets(), self.duration.sum)
        in_flight = GaugeMetricFamily(
            "twlb_node_in_flight_requests", "Work requests being served.", labels=["node"]
        )
        in_flight.add_metric(node, self.in_flight)
        dropped = CounterMetricFamily(
            "twlb_node_dropped_connections",
            "Work requests whose connection was dropped by simulated packet loss.",
            labels=["node"],
        )
        dropped.add_metric(node, self.dropped)
        yield from (requests, duration, in_flight, dropped)


_BEARER = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class ControlAuth:
    """Dependency guarding /control: the configured bearer token, or 403 when there is none."""

    token: Token

    def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
    ) -> None:
        if self.token.value is None:
            raise HTTPException(
                403,
                "the control endpoint is disabled: start the node with --control-token-file "
                "or TWLB_BACKEND_CONTROL_TOKEN to enable it",
            )
        given = credentials.credentials if credentials else ""
        if not self.token.matches(given):
            raise HTTPException(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )


#: The answers of a /control route when the token is missing, wrong or not configured.
CONTROL_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No bearer token, or the wrong one."},
    403: {"description": "Fault control is disabled (no --control-token)."},
}

ASGIHandler = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class BackendApp(FastAPI):
    """FastAPI with its hot route, /work, served as plain ASGI in front of the framework.

    /work then costs no middleware or routing, and it receives the server's own `send`,
    which `drop_connection` needs. Everything else goes through FastAPI as usual.
    """

    work_endpoint: ASGIHandler | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            super().openapi()["paths"]["/work"] = WORK_OPENAPI
        return self.openapi_schema

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if self.work_endpoint is not None and scope["type"] == "http" and scope["path"] == "/work":
            await self.work_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


JSON_CONTENT_TYPE = (b"content-type", b"application/json")


async def send_json(send: Any, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    """Send one complete JSON response through a raw ASGI `send`."""
    headers = [JSON_CONTENT_TYPE, (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timer_pause(seconds: float, rng: random.Random) -> float:
    """A pause in whole milliseconds whose mean is `seconds`.

    uvloop's timers round to the millisecond, which would turn a node's 1.6 ms into 2 ms
    and 0.4 ms into nothing; rounding up or down at random keeps every node's mean latency.
    """
    ms = seconds * 1000.0
    whole = math.floor(ms)
    return (whole + (rng.random() < ms - whole)) / 1000.0


async def drop_connection(send: Any) -> None:
    """Abort the request's TCP connection so the client gets no HTTP answer at all.

    ASGI has no message for this, so we reach the transport through uvicorn's
    request-response cycle (the owner of the `send` it hands to the app).
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("cannot drop a connection: the server does not expose its transport")
    transport.abort()
    # Let the server see the connection as lost before we return, so it answers nothing.
    await asyncio.sleep(0)


def _crash(node_id: str) -> None:
    log.error("crash fault: node %s exits with status %d", node_id, CRASH_EXIT_STATUS)
    logging.shutdown()
    os._exit(CRASH_EXIT_STATUS)


def create_app(settings: BackendSettings) -> FastAPI:
    """One backend node: its work route, probes, metrics and fault control."""
    node_id = settings.node_id
    started = time.monotonic()
    injector = FaultInjector(
        settings.fault, random.Random(f"twlb-node-faults:{settings.seed}"), started
    )
    simulation = NodeSimulation(
        settings.seed, started, enabled=settings.simulation, packet_loss=settings.packet_loss
    )
    timer_rng = random.Random(f"twlb-node-timer:{settings.seed}")
    metrics = NodeMetrics(node_id)
    metrics.report_fault(injector.reported_type)
    process = psutil.Process()
    ready = False
    gossip_run = settings.gossip_run()
    gossip = GossipService(gossip_run, metrics.registry, node_id) if gossip_run else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal ready
        if gossip is not None:
            await gossip.start()
        ready = True
        log.info("node %s ready, fault %s", node_id, _fault_summary(injector.spec))
        yield
        ready = False
        if gossip is not None:
            await gossip.stop()

    # Prometheus is the node's telemetry; FastAPI's native OpenTelemetry hooks would cost
    # every request a provider lookup for nothing.
    app = BackendApp(
        title=f"twlb backend {node_id}",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    async def work(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        began = time.perf_counter()
        if scope["method"] != "GET":
            metrics.answered(405, time.perf_counter() - began)
            body = orjson.dumps({"error": f"method {scope['method']} not allowed; use GET"})
            await send_json(send, 405, body, (b"allow", b"GET"))
            return
        parsed = parse_work_query(scope["query_string"])
        if isinstance(parsed, list):
            metrics.answered(422, time.perf_counter() - began)
            await send_json(send, 422, problems_body("query", parsed))
            return
        key, rounds = parsed
        now = time.monotonic()
        decision = injector.decide(now, key)
        if decision.action is FaultAction.CRASH:
            _crash(node_id)
        latency_s, dropped = simulation.draw(now)
        seconds = latency_s + decision.delay_s
        metrics.in_flight += 1
        try:
            answer = digest(key, rounds)
            if seconds > 0.0 and (pause := timer_pause(seconds, timer_rng)) > 0.0:
                await asyncio.sleep(pause)
            if dropped:
                metrics.dropped += 1
                await drop_connection(send)
                return
        finally:
            metrics.in_flight -= 1
        if decision is NO_FAULT:
            body = orjson.dumps({"node": node_id, "key": key, "rounds": rounds, "digest": answer})
            metrics.answered(200, time.perf_counter() - began)
            await send_json(send, 200, body)
            return
        if decision.action is FaultAction.ERROR:
            status = decision.status
            body = orjson.dumps({"node": node_id, "error": "injected fault: error"})
        else:
            status = 200
            if decision.action is FaultAction.BYZANTINE:
                answer = injector.wrong_digest(answer)
            elif decision.action is FaultAction.COLLUDING:
                answer = injector.colluded_digest(key, rounds, answer)
            body = orjson.dumps({"node": node_id, "key": key, "rounds": rounds, "digest": answer})
        metrics.answered(status, time.perf_counter() - began - decision.hidden_delay_s)
        await send_json(send, status, body)

    app.work_endpoint = work

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP (faults act on /work only)."""
        return {"status": "ok", "node": node_id}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: started and not shutting down."""
        status = 200 if ready else 503
        body = {"status": "ready" if ready else "not ready", "node": node_id}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    @app.get("/gossip")
    async def gossip_view() -> Response:
        """This node's gossip membership: protocol, its address and every member's state."""
        if gossip is None:
            body = {"error": "gossip is off on this node (start it with --gossip)"}
            return Response(orjson.dumps(body), status_code=404, media_type="application/json")
        return Response(orjson.dumps(gossip.describe()), media_type="application/json")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        if simulation.enabled:
            c = simulation.conditions(time.monotonic())
            metrics.cpu.set(c.cpu_utilization)
            metrics.memory.set(c.memory_bytes)
            metrics.network_latency.set(c.network_latency_s)
        else:
            metrics.cpu.set(process.cpu_percent() / (100.0 * (psutil.cpu_count() or 1)))
            metrics.memory.set(process.memory_info().rss)
            metrics.network_latency.set(0.0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    require_control_token = ControlAuth(Token(settings.control_token, settings.control_token_file))

    def fault_state() -> dict[str, Any]:
        now = time.monotonic()
        return {
            "node": node_id,
            "fault": injector.spec.model_dump(mode="json", by_alias=True),
            "activeForS": round(now - injector.since, 3),
            # A flapping node's current half: the ground truth of this very moment.
            "faultyNow": injector.in_faulty_period(now),
        }

    @app.get(
        "/control/fault",
        dependencies=[Depends(require_control_token)],
        responses=CONTROL_REFUSALS,
    )
    async def get_fault() -> dict[str, Any]:
        """The active fault (the ground truth, including what a lie-latency node hides)."""
        return fault_state()

    @app.put(
        "/control/fault",
        dependencies=[Depends(require_control_token)],
        responses=CONTROL_REFUSALS | {422: {"description": "An invalid fault, fields named."}},
    )
    async def put_fault(request: Request) -> Response:
        """Replace the active fault from now on (fields not given take their defaults).

        The body is read as JSON whatever its content type (`curl -d` sends a form type);
        an invalid body leaves the previous fault active.
        """
        try:
            fault = FaultSpec.model_validate(orjson.loads(await request.body()))
        except orjson.JSONDecodeError as err:
            return problems_response("fault", [FieldProblem("body", f"not JSON: {err}")])
        except ValidationError as err:
            return problems_response("fault", _validation_problems(err.errors()))
        injector.switch(fault, time.monotonic())
        metrics.report_fault(injector.reported_type)
        log.info("node %s fault switched to %s", node_id, _fault_summary(fault))
        return Response(orjson.dumps(fault_state()), media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> Response:
        return problems_response("request", _validation_problems(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> Response:
        return Response(
            orjson.dumps({"error": err.detail}),
            status_code=err.status_code,
            headers=err.headers,
            media_type="application/json",
        )

    return app


def _validation_problems(errors: Sequence[Any]) -> list[FieldProblem]:
    """Pydantic/FastAPI errors as FieldProblems named by field (camelCase, as sent)."""
    problems = []
    for e in errors:
        loc = [str(p) for p in e["loc"]]
        if len(loc) > 1 and loc[0] in ("body", "query", "header", "path"):
            loc = loc[1:]
        problems.append(FieldProblem(".".join(loc) or "body", e["msg"]))
    return problems


def _fault_summary(spec: FaultSpec) -> str:
    return orjson.dumps(spec.model_dump(mode="json", by_alias=True)).decode()
