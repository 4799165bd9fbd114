"""What a balancer tells about the requests it proxies: request ids, W3C trace context to
the backends, OpenTelemetry spans to an OTLP collector, JSON access log lines.

The backend here is a real HTTP server on loopback that records the headers it gets,
and the collector a real OTLP/HTTP receiver this test runs (it decodes the protobuf
export requests the balancer's SDK sends), both in the test's event loop; the balancer
is a real `twlb balancer` process.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Recorder:
    """A backend that answers /work and records every request's headers."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def work(self, request: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"digest": "d", "node": "recorder"})

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})


class Collector:
    """An OTLP/HTTP trace receiver: every span exported to it, decoded."""

    def __init__(self) -> None:
        self.spans: list = []

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def parts() -> AsyncIterator[tuple[Recorder, Collector, str, str]]:
    recorder, collector = Recorder(), Collector()
    app = web.Application()
    app.router.add_get("/work", recorder.work)
    app.router.add_get("/healthz", recorder.healthz)
    otlp = web.Application()
    otlp.router.add_post("/v1/traces", collector.traces)
    runners = []
    try:
        backend_runner, backend = await _serve(app)
        runners.append(backend_runner)
        otlp_runner, endpoint = await _serve(otlp)
        runners.append(otlp_runner)
        yield recorder, collector, backend, endpoint
    finally:
        for r in runners:
            await r.cleanup()


async def _balancer(tmp_path: Path, backend: str, env: dict[str, str], name: str):
    port, admin = free_port(), free_port()
    proc = ManagedProcess(
        twlb_argv(
            "balancer", "--port", str(port), "--admin-port", str(admin), "--backend", backend,
            "--gossip-poll", "0", "--model", "heuristic", "--log-format", "json",
            "--replica-id", name,
        ),
        env=env,
        log_path=tmp_path / f"{name}.log",
    ).start()  # fmt: skip
    await asyncio.to_thread(proc.wait_ready, f"http://127.0.0.1:{admin}/readyz", 60)
    return proc, f"http://127.0.0.1:{port}", tmp_path / f"{name}.log"


async def test_trace_context_reaches_the_backend_and_a_span_reaches_the_collector(
    tmp_path: Path, parts
) -> None:
    recorder, collector, backend, endpoint = parts
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    proc, url, log = await _balancer(tmp_path, backend, env, "traced")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            r = await client.get(
                "/work",
                params={"key": "k"},
                headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "req-42"},
            )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        got = recorder.seen[-1]
        version, trace, parent, flags = got["traceparent"].split("-")
        # The same trace; the backend's parent is the balancer's span, not the client's.
        assert (version, trace, flags) == ("00", TRACE, "01") and parent != PARENT
        assert got["x-request-id"] == "req-42"
        for _ in range(100):
            if collector.spans:
                break
            await asyncio.sleep(0.1)
        (span,) = [s for s in collector.spans if s.trace_id.hex() == TRACE]
        assert span.span_id.hex() == parent and span.parent_span_id.hex() == PARENT
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["http.response.status_code"].int_value == 200
        assert attributes["twlb.backend"].string_value == backend.replace("localhost", "127.0.0.1")
    finally:
        proc.stop()
    # The access log: one JSON object a line, this request's among them.
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    (access,) = [x for x in lines if x.get("request_id") == "req-42"]
    assert access["logger"] == "twlb.access" and access["status"] == 200
    assert access["path"] == "/work" and access["tries"] == 1 and access["replica"] == "traced"
    assert all("message" in x and "level" in x and "time" in x for x in lines)


async def test_without_an_otlp_endpoint_the_clients_trace_context_passes_unchanged(
    tmp_path: Path, parts
) -> None:
    recorder, collector, backend, _ = parts
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc, url, _log = await _balancer(tmp_path, backend, env, "plain")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            header = f"00-{TRACE}-{PARENT}-01"
            r = await client.get("/work", headers={"traceparent": header, "tracestate": "a=1"})
            assert r.status_code == 200
            got = recorder.seen[-1]
            assert got["traceparent"] == header and got["tracestate"] == "a=1"
            # A request id is made when the client sends none (or an unusable one).
            made = r.headers["x-request-id"]
            assert len(made) == 16 and got["x-request-id"] == made
            r = await client.get("/work", headers={"x-request-id": "bad id"})
            assert r.headers["x-request-id"] != "bad id"
    finally:
        proc.stop()
    assert not collector.spans
