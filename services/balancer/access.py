"""What the balancer tells about each request it proxies: a request id, an access log
line, and a trace span.

- **Request id.** A client's `X-Request-Id` is kept when it is a short token of visible
  characters, else the balancer makes one; it goes to the backend and back to the client.
- **Access log.** One line a request on the `twlb.access` logger, as text or JSON
  (`twlb.logs`): wall-clock time, request id, method, path, status, backend, tries,
  audit verdict and duration; `--access-log-sample` is the share written. A request whose
  answer is audited is written when the audit's verdict is in (`agreed`, `mismatch`,
  `no_quorum`); any other with `audit: null`.
- **Traces.** With an OTLP endpoint configured (the standard `OTEL_EXPORTER_OTLP_ENDPOINT`
  or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), each proxied request is a server span, child
  of the client's W3C `traceparent` when it sent one, exported in batches by the
  OpenTelemetry SDK over OTLP/HTTP; the backend gets a `traceparent` naming that span as
  its parent. Without one, the client's `traceparent` and `tracestate` reach the backend
  as they came: the balancer is transparent.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

from twlb.logs import FIELDS, iso_utc

ACCESS = logging.getLogger("twlb.access")

#: Longest client request id kept (longer ones are replaced).
MAX_REQUEST_ID = 128

#: Variables that turn span export on (the OpenTelemetry SDK reads them itself).
OTLP_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_draw = random.Random().getrandbits


def request_id(offered: bytes | None) -> bytes:
    """The client's request id when it is a usable token, else a new one (16 hex digits)."""
    if (
        offered is not None
        and 0 < len(offered) <= MAX_REQUEST_ID
        and all(0x21 <= c <= 0x7E for c in offered)
    ):
        return offered
    return b"%016x" % _draw(64)


class AccessLog:
    """The access log's sampling and lines (`ACCESS`, at INFO whatever the process's
    log level: an access log is not a debug aid one turns down with the rest)."""

    def __init__(self, sample: float, seed: int = 0, replica: str | None = None) -> None:
        self.sample = sample
        self.replica = replica
        self._random = random.Random(seed ^ 0x5EED).random
        ACCESS.setLevel(logging.INFO)

    def sampled(self) -> bool:
        sample = self.sample
        return sample >= 1.0 or (sample > 0.0 and self._random() < sample)

    @staticmethod
    def start() -> tuple[float, float]:
        """A request's wall-clock arrival and its start on the performance counter."""
        return time.time(), time.perf_counter()

    def write(
        self,
        started: tuple[float, float],
        rid: bytes,
        method: str,
        path: bytes,
        status: int,
        backend: str | None,
        tries: int,
        audit: str | None,
        **more: Any,
    ) -> None:
        wall, began = started
        text = path.decode("latin-1")
        fields = {
            "request_time": iso_utc(wall, "Z"),
            "request_id": rid.decode("latin-1"),
            "method": method,
            "path": text,
            "status": status,
            "backend": backend,
            "tries": tries,
            "audit": audit,
            "duration_ms": int((time.perf_counter() - began) * 1e6) / 1000.0,
            "replica": self.replica,
        }
        if more:
            fields.update(more)
        # The fields ride as one ready dict (twlb.logs.FIELDS): one line a request.
        ACCESS.info("%s %s %d", method, text, status, extra={FIELDS: fields})


class Tracing:
    """Server spans of proxied requests, exported over OTLP/HTTP in batches."""

    def __init__(self, service_name: str, replica: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name,
             "service.instance.id": replica}
        )  # fmt: skip
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("twlb.balancer")
        self.propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    @staticmethod
    def configured(environ: Mapping[str, str] = os.environ) -> bool:
        """Whether an OTLP endpoint is configured (and spans are to be exported)."""
        return any(environ.get(v) for v in OTLP_VARIABLES)

    def start(self, method: str, path: bytes, parent: Mapping[str, str]) -> Any:
        """A server span for a request, child of the client's trace context (`parent`:
        its traceparent and tracestate headers, when it sent them)."""
        context = self.propagator.extract(parent) if parent else None
        return self.tracer.start_span(
            f"{method} {path.decode('latin-1')}",
            context=context,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": path.decode("latin-1")},
        )

    def headers(self, span: Any) -> list[tuple[bytes, bytes]]:
        """The trace context headers that make `span` the backend's parent."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=set_span_in_context(span))
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

    def end(self, span: Any, status: int, backend: str | None, tries: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if backend is not None:
            span.set_attribute("twlb.backend", backend)
        span.set_attribute("twlb.tries", tries)
        if status >= 500:
            span.set_status(self._error)
        span.end()

    def shutdown(self) -> None:
        """Export what is pending, then stop."""
        self.provider.shutdown()
