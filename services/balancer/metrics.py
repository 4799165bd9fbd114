"""The balancer's Prometheus metrics, one registry per balancer app.

The hot path only bumps plain integers (the balancer runs on one event loop thread, so
the locks of prometheus-client's Counter and Histogram would buy nothing and cost about
as much as the rest of the routing bookkeeping). A collector turns those integers, and
the live trust, liveness and feature windows of the balancer, into metric families at
scrape time; prometheus-client renders the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
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
    "quorum_failed",  # no two backends agreed: 502
    "bad_request",  # malformed balancer headers (quorum, length): 400
)

#: Audit results (`twlb_balancer_audits_total{result}`).
AUDIT_RESULTS = ("agreed", "mismatch", "no_quorum")


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
    """All metrics of one balancer; register-once collector over plain counters."""

    def __init__(self, view: Callable[[], LiveView]) -> None:
        self._view = view
        self.requests = dict.fromkeys(REQUEST_OUTCOMES, 0)
        self.retries = 0
        self.retries_refused = 0
        self.audits = dict.fromkeys(AUDIT_RESULTS, 0)
        # What one trust tick (features of every backend, then the trust engine) costs, and
        # how often it took longer than its period: the budget a large fleet must keep.
        self.trust_tick = PlainHistogram(DURATION_BUCKETS)
        self.trust_tick_overruns = 0
        # Every backend ever seen keeps its counters (counters never go down or vanish).
        self.backends: dict[str, BackendCounters] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def backend(self, url: str) -> BackendCounters:
        """The counters of a backend, created on first use."""
        counters = self.backends.get(url)
        if counters is None:
            counters = self.backends[url] = BackendCounters()
        return counters

    def exposition(self) -> bytes:
        """The text exposition format of every metric in this balancer's registry."""
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "twlb_balancer_requests", "Client requests by how they ended.", labels=["outcome"]
        )
        for outcome, n in self.requests.items():
            requests.add_metric([outcome], n)
        yield requests

        tries = CounterMetricFamily(
            "twlb_balancer_upstream_requests",
            "Tries sent to backends, by backend and outcome.",
            labels=["backend", "outcome"],
        )
        duration = HistogramMetricFamily(
            "twlb_balancer_upstream_duration_seconds",
            "Duration of tries sent to backends.",
            labels=["backend"],
        )
        checks = CounterMetricFamily(
            "twlb_balancer_audit_checks",
            "Agreeing audits a backend took part in (mismatch ratio = mismatches / checks).",
            labels=["backend"],
        )
        mismatches = CounterMetricFamily(
            "twlb_balancer_audit_mismatches",
            "Audits in which a backend was the odd one out.",
            labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "twlb_balancer_ejections",
            "Times a backend left rotation, by reason (model, proven_liar, health, gossip).",
            labels=["backend", "reason"],
        )
        readmissions = CounterMetricFamily(
            "twlb_balancer_readmissions",
            "Times an ejected backend came back into rotation.",
            labels=["backend"],
        )
        holds = CounterMetricFamily(
            "twlb_balancer_holds",
            "Times the floor kept a backend below the ejection threshold in rotation.",
            labels=["backend"],
        )
        for url, c in self.backends.items():
            for outcome, n in c.outcomes.items():
                tries.add_metric([url, outcome.value], n)
            duration.add_metric([url], c.duration.cumulative_buckets(), c.duration.sum)
            checks.add_metric([url], c.audits)
            mismatches.add_metric([url], c.mismatches)
            for reason, n in c.ejections.items():
                ejections.add_metric([url, reason.value], n)
            readmissions.add_metric([url], c.readmissions)
            holds.add_metric([url], c.holds)
        yield from (tries, duration, checks, mismatches, ejections, readmissions, holds)

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
        held = GaugeMetricFamily(
            "twlb_balancer_held",
            "1 while the floor keeps a backend below the ejection threshold in rotation.",
            labels=["backend"],
        )
        for backend, is_held in view.held.items():
            held.add_metric([backend], 1.0 if is_held else 0.0)
        yield from (trust, up, feature, held)
