"""The balancer's Prometheus metrics, one registry per balancer app.

The hot path only bumps plain integers (the balancer runs on one event loop thread, so
the locks of prometheus-client's Counter and Histogram would buy nothing and cost about
as much as the rest of the routing bookkeeping). At scrape time those integers, and the
live trust, liveness and feature windows of the balancer, become the exposition:

- the fleet's totals (requests, retries, audits, trust ticks, the memory budget) and
  whatever else is registered in `registry` (the model reloader's gauges) are metric
  families rendered by prometheus-client;
- the per-backend families, about 45 series a backend (3.8 MB at 1,000 backends, 1.2 s
  of the event loop when prometheus-client rendered them), are written here as text, a
  slice of `RENDER_SLICE` backends per turn of the event loop, so a scrape never holds
  the loop for more than about a millisecond; one rendering serves every scrape that
  comes while it is made, and those of the next `RENDER_REUSE` times its cost (at most
  `EXPOSITION_MAX_AGE_S`): rendering takes at most about 5% of the loop however often
  clients scrape, and a small fleet's exposition is as fresh as it was (`scrape`).

Counters of a backend taken out of the fleet are dropped with it (`forget`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from itertools import accumulate
from time import perf_counter
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twlb.balancer.memory import MemoryBudget
from twlb.balancer.trust import ChangeKind, EjectionReason, TrustChange

from twlb.outcome import Outcome
from twlb.plain_metrics import PlainHistogram

#: Histogram bounds (seconds) for upstream tries: sub-millisecond to the longest timeouts.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip

#: Outcomes of whole client requests (`twlb_balancer_requests_total{outcome}`).
REQUEST_OUTCOMES = (
    "success",  # answered by a backend with 2xx-4xx
    "error",  # the last try answered 5xx
    "failed",  # no backend answered (timeouts, connection errors): 502/504
    "no_backend",  # nothing to route to: 503
    "too_large",  # body over the limit: 413
    "over_budget",  # the memory budget was spent: 503
    "quorum_failed",  # no two backends agreed: 502
    "bad_request",  # malformed balancer headers (quorum, length): 400
)

#: Audit results (`twlb_balancer_audits_total{result}`).
AUDIT_RESULTS = ("agreed", "mismatch", "no_quorum")

#: Backends whose series are written per turn of the event loop.
RENDER_SLICE = 50

#: A rendering is served again for this many times the loop time it took ...
RENDER_REUSE = 20
#: ... and at most this many seconds.
EXPOSITION_MAX_AGE_S = 1.0


def _head(name: str, kind: str, doc: str) -> str:
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


#: The per-backend families, in the order they are written: (name, type, help).
BACKEND_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "twlb_balancer_upstream_requests_total",
        "counter",
        "Tries sent to backends, by backend and outcome.",
    ),  # fmt: skip
    (
        "twlb_balancer_upstream_duration_seconds",
        "histogram",
        "Duration of tries sent to backends.",
    ),  # fmt: skip
    (
        "twlb_balancer_audit_checks_total",
        "counter",
        "Agreeing audits a backend took part in (mismatch ratio = mismatches / checks).",
    ),  # fmt: skip
    (
        "twlb_balancer_audit_mismatches_total",
        "counter",
        "Audits in which a backend was the odd one out.",
    ),  # fmt: skip
    (
        "twlb_balancer_ejections_total",
        "counter",
        "Times a backend left rotation, by reason (model, proven_liar, health, gossip).",
    ),  # fmt: skip
    (
        "twlb_balancer_readmissions_total",
        "counter",
        "Times an ejected backend came back into rotation.",
    ),  # fmt: skip
    (
        "twlb_balancer_holds_total",
        "counter",
        "Times the floor kept a backend below the ejection threshold in rotation.",
    ),  # fmt: skip
    ("twlb_balancer_trust", "gauge", "Trust weight of a backend (0..1)."),
    (
        "twlb_balancer_backend_up",
        "gauge",
        "1 while a backend is in rotation by health, else 0.",
    ),  # fmt: skip
    (
        "twlb_balancer_feature",
        "gauge",
        "Live feature-window value of a backend (the trust model's inputs).",
    ),  # fmt: skip
    (
        "twlb_balancer_held",
        "gauge",
        "1 while the floor keeps a backend below the ejection threshold in rotation.",
    ),  # fmt: skip
)
_HEADS = tuple(_head(*family) for family in BACKEND_FAMILIES)
_BUCKET_BOUNDS = tuple(floatToGoString(b) for b in (*DURATION_BUCKETS, math.inf))


def _label(value: str) -> str:
    """A label value escaped for the text format, and for `%` formatting."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return escaped.replace("%", "%%")


class _BackendText:
    """One backend's lines of each family, with `%` fields for the values: written once
    per backend, filled in at each scrape (one formatting per family, not per line).
    Floats are written as Python's repr (`nan`, `inf`: Prometheus reads them as Go's
    ParseFloat does, whatever the case)."""

    __slots__ = (
        "label", "tries", "duration", "checks", "mismatches", "ejections", "readmissions",
        "holds", "trust", "up", "held", "_feature_names", "_features",
    )  # fmt: skip

    def __init__(self, url: str) -> None:
        b = self.label = f'{{backend="{_label(url)}"'
        name = "twlb_balancer_upstream_requests_total"
        self.tries = "".join(f'{name}{b},outcome="{o.value}"}} %d\n' for o in Outcome)
        name = "twlb_balancer_upstream_duration_seconds"
        self.duration = "".join(f'{name}_bucket{b},le="{le}"}} %d\n' for le in _BUCKET_BOUNDS)
        self.duration += f"{name}_count{b}}} %d\n{name}_sum{b}}} %r\n"
        self.checks = f"twlb_balancer_audit_checks_total{b}}} %d\n"
        self.mismatches = f"twlb_balancer_audit_mismatches_total{b}}} %d\n"
        name = "twlb_balancer_ejections_total"
        self.ejections = "".join(f'{name}{b},reason="{r.value}"}} %d\n' for r in EjectionReason)
        self.readmissions = f"twlb_balancer_readmissions_total{b}}} %d\n"
        self.holds = f"twlb_balancer_holds_total{b}}} %d\n"
        self.trust = f"twlb_balancer_trust{b}}} %r\n"
        self.up = f"twlb_balancer_backend_up{b}}} %r\n"
        self.held = f"twlb_balancer_held{b}}} %r\n"
        self._feature_names: tuple[str, ...] = ()
        self._features = ""

    def features(self, names: tuple[str, ...]) -> str:
        """The feature lines for these feature names, in this order."""
        if names != self._feature_names:
            b = self.label
            self._feature_names = names
            self._features = "".join(
                f'twlb_balancer_feature{b},feature="{_label(n)}"}} %r\n' for n in names
            )
        return self._features


class ServerStats(Protocol):
    """What the metrics read from the balancer's HTTP server (`http_server.HttpServer`)."""

    connections: Sized
    evicted: int


@dataclass(frozen=True)
class LiveView:
    """What the scrape-time collector reads from the running balancer."""

    trust: Mapping[str, float]
    up: Mapping[str, bool]
    features: Mapping[str, Mapping[str, float]]
    held: Mapping[str, bool] = field(default_factory=dict)  # kept in rotation by the floor


class BackendCounters:
    """Tries, their durations, audit verdicts and rotation events of one backend, as plain
    counts."""

    __slots__ = ("outcomes", "duration", "audits", "mismatches", "ejections", "readmissions", "holds")  # fmt: skip

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(Outcome, 0)
        self.duration = PlainHistogram(DURATION_BUCKETS)
        self.audits = 0  # agreeing audits this backend took part in
        self.mismatches = 0  # of which it was the odd one out
        self.ejections = dict.fromkeys(EjectionReason, 0)
        self.readmissions = 0
        self.holds = 0

    def count_change(self, change: TrustChange) -> None:
        """Count one rotation event of this backend."""
        match change.kind:
            case ChangeKind.EJECTION:
                self.ejections[change.reason or EjectionReason.MODEL] += 1
            case ChangeKind.READMISSION:
                self.readmissions += 1
            case ChangeKind.HOLD:
                self.holds += 1

    def observe(self, outcome: Outcome, latency_s: float) -> None:
        self.outcomes[outcome] += 1
        self.duration.observe(latency_s)


class BalancerMetrics(Collector):
    """All metrics of one balancer over plain counters: the fleet's totals as a collector
    registered in `registry`, the per-backend series written by `render`."""

    def __init__(self, view: Callable[[], LiveView], memory: MemoryBudget | None = None) -> None:
        self._view = view
        self.memory = memory
        self.server: ServerStats | None = None  # set once the HTTP server runs
        self.requests = dict.fromkeys(REQUEST_OUTCOMES, 0)
        self.retries = 0
        self.retries_refused = 0
        self.audits = dict.fromkeys(AUDIT_RESULTS, 0)
        # What one trust tick (features of every backend, then the trust engine) costs, and
        # how often it took longer than its period: the budget a large fleet must keep.
        self.trust_tick = PlainHistogram(DURATION_BUCKETS)
        self.trust_tick_overruns = 0
        # The counters of every backend in the fleet (dropped with it: `forget`).
        self.backends: dict[str, BackendCounters] = {}
        self._texts: dict[str, _BackendText] = {}  # each backend's lines, values to fill in
        # Answers to clients by status code, from the request's dispatch to its answer's
        # write: the request duration as the client sees it, less the network.
        self.answers: dict[int, PlainHistogram] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)
        self._exposition: bytes | None = None
        self._fresh_until = -math.inf
        self._render_cost = 0.0  # loop seconds the last rendering took
        self._rendering: asyncio.Task[bytes] | None = None

    def observe_answer(self, status: int, seconds: float) -> None:
        """One answer to a client: its status code and its duration."""
        histogram = self.answers.get(status)
        if histogram is None:
            histogram = self.answers[status] = PlainHistogram(DURATION_BUCKETS)
        histogram.observe(seconds)

    def backend(self, url: str) -> BackendCounters:
        """The counters of a backend, created on first use."""
        counters = self.backends.get(url)
        if counters is None:
            counters = self.backends[url] = BackendCounters()
        return counters

    def forget(self, url: str) -> None:
        """A backend left the fleet: its series go with it."""
        self.backends.pop(url, None)
        self._texts.pop(url, None)

    async def scrape(self) -> bytes:
        """The exposition: the last rendering if it is recent, else a new one (one at a
        time, shared by every scrape that asks meanwhile)."""
        loop = asyncio.get_running_loop()
        if self._exposition is not None and loop.time() < self._fresh_until:
            return self._exposition
        task = self._rendering
        if task is None:
            task = self._rendering = loop.create_task(self.render(), name="twlb-metrics")
            task.add_done_callback(self._rendered)
        return await asyncio.shield(task)

    def _rendered(self, task: asyncio.Task[bytes]) -> None:
        self._rendering = None
        if not task.cancelled() and task.exception() is None:
            self._exposition = task.result()
            reuse = min(EXPOSITION_MAX_AGE_S, RENDER_REUSE * self._render_cost)
            self._fresh_until = asyncio.get_running_loop().time() + reuse

    async def render(self) -> bytes:
        """Every metric of this balancer in the text format, the per-backend series a
        slice of RENDER_SLICE backends per turn of the event loop."""
        began = perf_counter()
        head = generate_latest(self.registry)
        view = self._view()
        counted = list(self.backends.items())
        viewed = list(view.trust)
        parts: list[list[bytes]] = [[h.encode("utf-8")] for h in _HEADS]
        spent = 0.0
        for start in range(0, max(len(counted), len(viewed)), RENDER_SLICE):
            if start:
                spent += perf_counter() - began
                await asyncio.sleep(0)
                began = perf_counter()
            lines: list[list[str]] = [[] for _ in BACKEND_FAMILIES]
            for url, c in counted[start : start + RENDER_SLICE]:
                self._counter_lines(url, c, lines)
            for url in viewed[start : start + RENDER_SLICE]:
                self._view_lines(url, view, lines)
            for family, rendered in zip(parts, lines, strict=True):
                if rendered:
                    family.append("".join(rendered).encode("utf-8"))
        exposition = b"".join([head, *(b"".join(family) for family in parts)])
        self._render_cost = spent + perf_counter() - began
        return exposition

    def _text_of(self, url: str) -> _BackendText:
        text = self._texts.get(url)
        if text is None:
            text = self._texts[url] = _BackendText(url)
        return text

    def _counter_lines(self, url: str, c: BackendCounters, out: list[list[str]]) -> None:
        t = self._text_of(url)
        tries, duration, checks, mismatches, ejections, readmissions, holds = out[:7]
        tries.append(t.tries % tuple(c.outcomes.values()))
        buckets = tuple(accumulate(c.duration.counts))
        duration.append(t.duration % (*buckets, buckets[-1], c.duration.sum))
        checks.append(t.checks % c.audits)
        mismatches.append(t.mismatches % c.mismatches)
        ejections.append(t.ejections % tuple(c.ejections.values()))
        readmissions.append(t.readmissions % c.readmissions)
        holds.append(t.holds % c.holds)

    def _view_lines(self, url: str, view: LiveView, out: list[list[str]]) -> None:
        t = self._text_of(url)
        trust, up, feature, held = out[7:]
        trust.append(t.trust % float(view.trust[url]))
        if url in view.up:
            up.append(t.up % (1.0 if view.up[url] else 0.0))
        values = view.features.get(url)
        if values:
            feature.append(t.features(tuple(values)) % tuple(map(float, values.values())))
        if url in view.held:
            held.append(t.held % (1.0 if view.held[url] else 0.0))

    def collect(self) -> Iterable[Metric]:
        """The fleet's totals (the per-backend series are written by `render`)."""
        requests = CounterMetricFamily(
            "twlb_balancer_requests", "Client requests by how they ended.", labels=["outcome"]
        )
        for outcome, n in self.requests.items():
            requests.add_metric([outcome], n)
        yield requests

        retries = CounterMetricFamily("twlb_balancer_retries", "Tries repeated on another backend.")
        retries.add_metric([], self.retries)
        refused = CounterMetricFamily(
            "twlb_balancer_retries_refused",
            "Retries not sent because the retry budget was spent.",
        )
        refused.add_metric([], self.retries_refused)
        audits = CounterMetricFamily(
            "twlb_balancer_audits", "Audits (answer comparisons) by result.", labels=["result"]
        )
        for result, n in self.audits.items():
            audits.add_metric([result], n)
        tick = HistogramMetricFamily(
            "twlb_balancer_trust_tick_duration_seconds",
            "Compute time of one trust tick (features of every backend, trust update).",
        )
        tick.add_metric([], self.trust_tick.cumulative_buckets(), self.trust_tick.sum)
        overruns = CounterMetricFamily(
            "twlb_balancer_trust_tick_overruns", "Trust ticks that took longer than their period."
        )
        overruns.add_metric([], self.trust_tick_overruns)
        yield from (retries, refused, audits, tick, overruns)
        answers = HistogramMetricFamily(
            "twlb_balancer_request_duration_seconds",
            "Client requests from their dispatch to their answer's write, by status code.",
            labels=["code"],
        )
        for code, histogram in sorted(self.answers.items()):
            answers.add_metric([str(code)], histogram.cumulative_buckets(), histogram.sum)
        yield answers

        memory = self.memory
        if memory is not None:
            budget = GaugeMetricFamily(
                "twlb_balancer_memory_bytes",
                "Bytes of requests and answers in flight (used) against the memory budget (limit).",
                labels=["kind"],
            )
            budget.add_metric(["used"], memory.used)
            budget.add_metric(["limit"], memory.limit)
            refused = CounterMetricFamily(
                "twlb_balancer_memory_refusals",
                "Requests and tries refused because the memory budget was spent.",
            )
            refused.add_metric([], memory.refused)
            yield from (budget, refused)
        server = self.server
        if server is not None:
            open_ = GaugeMetricFamily(
                "twlb_balancer_client_connections", "Open client connections."
            )
            open_.add_metric([], len(server.connections))
            evicted = CounterMetricFamily(
                "twlb_balancer_client_connections_evicted",
                "Client connections closed at the connection cap to make room for a new one "
                "(each had waited longest for its client).",
            )
            evicted.add_metric([], server.evicted)
            yield from (open_, evicted)
