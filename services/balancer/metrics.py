"""The balancer's Prometheus metrics, one registry per balancer app.

Counters and the latency histogram are updated on the hot path through cached label
children (a `labels()` lookup per request would cost a lock and a dict build). Trust,
backend liveness and the feature windows are read from the live balancer at scrape time
by a collector, so a removed backend disappears from them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twlb.outcome import Outcome

#: Histogram buckets (seconds) for upstream tries: sub-millisecond to the longest timeouts.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip

#: Outcomes of whole client requests (`twlb_balancer_requests_total{outcome}`).
REQUEST_OUTCOMES = (
    "success",  # answered by a backend with 2xx-4xx
    "error",  # the last try answered 5xx
    "failed",  # no backend answered (timeouts, connection errors): 502/504
    "no_backend",  # nothing to route to: 503
    "too_large",  # body over the limit: 413
    "quorum_failed",  # no two backends agreed: 502
)

#: Audit results (`twlb_balancer_audits_total{result}`).
AUDIT_RESULTS = ("agreed", "mismatch", "no_quorum")


@dataclass(frozen=True)
class LiveView:
    """What the scrape-time collector reads from the running balancer."""

    trust: Mapping[str, float]
    up: Mapping[str, bool]
    features: Mapping[str, Mapping[str, float]]


class _LiveCollector(Collector):
    def __init__(self, view: Callable[[], LiveView]) -> None:
        self._view = view

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        trust = GaugeMetricFamily(
            "twlb_balancer_trust", "Trust weight of a backend (0..1).", labels=["backend"]
        )
        for backend, weight in view.trust.items():
            trust.add_metric([backend], weight)
        up = GaugeMetricFamily(
            "twlb_balancer_backend_up",
            "1 while a backend is in rotation by health, else 0.",
            labels=["backend"],
        )
        for backend, is_up in view.up.items():
            up.add_metric([backend], 1.0 if is_up else 0.0)
        feature = GaugeMetricFamily(
            "twlb_balancer_feature",
            "Live feature-window value of a backend (the trust model's inputs).",
            labels=["backend", "feature"],
        )
        for backend, values in view.features.items():
            for name, value in values.items():
                feature.add_metric([backend, name], float(value))
        return [trust, up, feature]


class BackendMetrics:
    """Cached label children of one backend (the hot path touches only these)."""

    __slots__ = ("outcomes", "duration", "audits", "mismatches")

    def __init__(self, metrics: BalancerMetrics, backend: str) -> None:
        self.outcomes = {
            o: metrics.upstream_requests.labels(backend=backend, outcome=o.value) for o in Outcome
        }
        self.duration = metrics.upstream_duration.labels(backend=backend)
        self.audits = metrics.audit_checks.labels(backend=backend)
        self.mismatches = metrics.audit_mismatches.labels(backend=backend)

    def observe(self, outcome: Outcome, latency_s: float) -> None:
        self.outcomes[outcome].inc()
        self.duration.observe(latency_s)


class BalancerMetrics:
    """All metrics of one balancer, registered in a registry of its own."""

    def __init__(self, view: Callable[[], LiveView]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "twlb_balancer_requests",
            "Client requests by how they ended.",
            ["outcome"],
            registry=r,
        )
        self.request_outcomes = {o: self.requests.labels(outcome=o) for o in REQUEST_OUTCOMES}
        self.upstream_requests = Counter(
            "twlb_balancer_upstream_requests",
            "Tries sent to backends, by backend and outcome.",
            ["backend", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "twlb_balancer_upstream_duration_seconds",
            "Duration of tries sent to backends.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "twlb_balancer_retries", "Tries repeated on another backend.", registry=r
        )
        self.retries_refused = Counter(
            "twlb_balancer_retries_refused",
            "Retries not sent because the retry budget was spent.",
            registry=r,
        )
        self.audits = Counter(
            "twlb_balancer_audits",
            "Audits (three-way comparisons) by result.",
            ["result"],
            registry=r,
        )
        self.audit_results = {a: self.audits.labels(result=a) for a in AUDIT_RESULTS}
        self.audit_checks = Counter(
            "twlb_balancer_audit_checks",
            "Agreeing audits a backend took part in (mismatch ratio = mismatches / checks).",
            ["backend"],
            registry=r,
        )
        self.audit_mismatches = Counter(
            "twlb_balancer_audit_mismatches",
            "Audits in which a backend was the odd one out.",
            ["backend"],
            registry=r,
        )
        r.register(_LiveCollector(view))
        self._backends: dict[str, BackendMetrics] = {}

    def backend(self, url: str) -> BackendMetrics:
        """The cached children of a backend, created on first use."""
        bm = self._backends.get(url)
        if bm is None:
            bm = self._backends[url] = BackendMetrics(self, url)
        return bm

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
