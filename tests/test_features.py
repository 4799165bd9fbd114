"""Feature windows: raw aggregates per backend and fleet-relative features."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.balancer.features import (
    FEATURE_NAMES,
    REL_CAP,
    FeatureWindow,
    FleetWindows,
    WindowStats,
    compute_features,
    feature_vector,
    histogram_quantiles,
    latency_bin,
)

from twlb.outcome import Outcome


def test_features_of_hand_made_windows() -> None:
    stats = {
        "fast": WindowStats(
            requests=100,
            successes=90,
            errors_5xx=5,
            timeouts=3,
            connect_errors=2,
            latency_p50_s=0.010,
            latency_p95_s=0.020,
            latency_p99_s=0.040,
            audits=10,
            audit_mismatches=1,
            health_checks=5,
            health_failures=1,
            inflight_mean=1.5,
        ),
        "mid": WindowStats(
            requests=50, successes=50, latency_p50_s=0.020, latency_p95_s=0.030, latency_p99_s=0.035
        ),
        "slow": WindowStats(
            requests=10, successes=10, latency_p50_s=0.100, latency_p95_s=0.400, latency_p99_s=5.0
        ),
    }
    f = compute_features(stats)
    assert list(f["fast"]) == list(FEATURE_NAMES)
    assert f["fast"]["request_count_log1p"] == pytest.approx(math.log1p(100))
    assert f["fast"]["success_ratio"] == pytest.approx(0.90)
    assert f["fast"]["error_5xx_ratio"] == pytest.approx(0.05)
    assert f["fast"]["timeout_ratio"] == pytest.approx(0.03)
    assert f["fast"]["connect_error_ratio"] == pytest.approx(0.02)
    assert f["fast"]["audit_mismatch_ratio"] == pytest.approx(0.1)
    assert f["fast"]["audit_count_log1p"] == pytest.approx(math.log1p(10))
    assert f["fast"]["health_fail_ratio"] == pytest.approx(0.2)
    assert f["fast"]["inflight_mean"] == 1.5
    # the fleet median of p50 is 0.020 (mid's)
    assert f["fast"]["latency_p50_rel"] == pytest.approx(0.5)
    assert f["mid"]["latency_p95_rel"] == pytest.approx(1.5)
    assert f["slow"]["latency_p95_rel"] == pytest.approx(20.0)
    assert f["slow"]["latency_p99_rel"] == pytest.approx(250.0 if REL_CAP > 250 else REL_CAP)


def test_no_data_conventions() -> None:
    f = compute_features({"quiet": WindowStats(), "busy": WindowStats(requests=3, successes=3)})
    for features in f.values():
        assert features["success_ratio"] == 1.0
        assert features["error_5xx_ratio"] == features["timeout_ratio"] == 0.0
        assert features["latency_p50_rel"] == features["latency_p99_rel"] == 1.0
        assert features["audit_mismatch_ratio"] == features["health_fail_ratio"] == 0.0
    assert compute_features({}) == {}


def test_feature_vector_follows_feature_names() -> None:
    f = compute_features({"a": WindowStats(requests=4, successes=2, errors_5xx=2)})["a"]
    row = feature_vector(f)
    assert len(row) == len(FEATURE_NAMES)
    assert row[FEATURE_NAMES.index("error_5xx_ratio")] == 0.5
    del f["timeout_ratio"]
    with pytest.raises(KeyError, match="timeout_ratio"):
        feature_vector(f)


def test_window_counts_outcomes_and_approximates_quantiles() -> None:
    rng = random.Random(5)
    window = FeatureWindow(window_s=5.0, resolution_s=0.25)
    latencies = []
    for i in range(2000):
        now = i * 0.002
        latency = rng.lognormvariate(math.log(0.02), 0.5)
        latencies.append(latency)
        window.record_request(now, Outcome.SUCCESS, latency)
    window.record_request(4.0, Outcome.CONNECT_ERROR, 0.0001)  # no latency sample
    window.record_request(4.0, Outcome.TIMEOUT, 2.0)
    latencies.append(2.0)
    window.record_audit(4.0, mismatch=True)
    window.record_audit(4.0, mismatch=False)
    window.record_health(4.0, ok=False)
    window.record_inflight(4.0, 2)
    window.record_inflight(4.0, 4)
    s = window.stats(4.0)
    assert (s.requests, s.successes, s.timeouts, s.connect_errors) == (2002, 2000, 1, 1)
    assert (s.audits, s.audit_mismatches, s.health_checks, s.health_failures) == (2, 1, 1, 1)
    assert s.inflight_mean == 3.0
    for got, q in ((s.latency_p50_s, 50), (s.latency_p95_s, 95), (s.latency_p99_s, 99)):
        assert got == pytest.approx(np.percentile(latencies, q), rel=0.05)


def test_window_keeps_only_the_last_window_s() -> None:
    short, long = FeatureWindow(window_s=5.0, resolution_s=0.5), FeatureWindow(window_s=10.0)
    for window in (short, long):
        window.record_request(1.0, Outcome.ERROR, 0.01)
        window.record_request(9.0, Outcome.SUCCESS, 0.01)
    assert short.stats(10.0).requests == 1
    assert long.stats(10.0).requests == 2
    assert long.stats(100.0) == WindowStats()
    long.record_audit(100.0, mismatch=True)  # a window emptied and filled again
    assert long.stats(100.0) == WindowStats(audits=1, audit_mismatches=1)


def test_memory_is_bounded_by_the_window() -> None:
    window = FeatureWindow(window_s=10.0, resolution_s=0.5)
    for i in range(50_000):  # 500 s of traffic at 100 requests per second
        window.record_request(i * 0.01, Outcome.SUCCESS, 0.01)
    assert len(window) <= 10.0 / 0.5 + 2
    assert window.stats(500.0).requests == pytest.approx(1000, abs=60)


def test_fleet_windows_keep_known_backends_and_compute_features() -> None:
    fleet = FleetWindows(window_s=5.0)
    fleet.set_backends(["a", "b"])
    fleet["a"].record_request(1.0, Outcome.ERROR, 0.01)
    fleet["b"].record_request(1.0, Outcome.SUCCESS, 0.01)
    fleet.set_backends(["a", "c"])
    features = fleet.features(2.0)
    assert set(features) == {"a", "c"}
    assert features["a"]["error_5xx_ratio"] == 1.0
    assert features["c"]["request_count_log1p"] == 0.0


def test_bad_window_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="resolution_s"):
        FeatureWindow(window_s=1.0, resolution_s=2.0)


_EVENT = st.tuples(
    st.floats(0.0, 3.0),  # seconds since the previous event
    st.sampled_from(["request", "audit", "health", "inflight", "stats"]),
    st.sampled_from(list(Outcome)),
    st.floats(1e-5, 5.0),  # latency, or the in-flight count / 1000
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_EVENT, max_size=120), window_s=st.sampled_from([1.0, 2.5, 5.0]))
def test_the_running_window_equals_a_recount_of_the_events_it_holds(
    events: list, window_s: float
) -> None:
    """The sums kept as buckets close and leave give what counting every event still in
    the window gives, at every moment, whatever the gaps between events."""
    res = 0.25
    window = FeatureWindow(window_s=window_s, resolution_s=res)
    seen: list[tuple[float, str, Outcome, float, bool]] = []
    now = 0.0
    for gap, kind, outcome, x, flag in events:
        now += gap
        if kind == "request":
            window.record_request(now, outcome, x)
        elif kind == "audit":
            window.record_audit(now, flag)
        elif kind == "health":
            window.record_health(now, flag)
        elif kind == "inflight":
            x = float(int(x * 1000))
            window.record_inflight(now, int(x))
        seen.append((now, kind, outcome, x, flag))
        first = math.floor((now - window_s) / res)
        held = [e for e in seen if math.floor(e[0] / res) >= first and e[1] != "stats"]
        reqs = [e for e in held if e[1] == "request"]
        timed = [e for e in reqs if e[2] is not Outcome.CONNECT_ERROR]
        hist: dict[int, int] = {}
        for e in timed:
            hist[latency_bin(e[3])] = hist.get(latency_bin(e[3]), 0) + 1
        p50, p95, p99 = histogram_quantiles(hist, (0.50, 0.95, 0.99))
        samples = [e[3] for e in held if e[1] == "inflight"]
        audits = [e for e in held if e[1] == "audit"]
        checks = [e for e in held if e[1] == "health"]
        assert window.stats(now) == WindowStats(
            requests=len(reqs),
            successes=sum(e[2] is Outcome.SUCCESS for e in reqs),
            errors_5xx=sum(e[2] is Outcome.ERROR for e in reqs),
            timeouts=sum(e[2] is Outcome.TIMEOUT for e in reqs),
            connect_errors=sum(e[2] is Outcome.CONNECT_ERROR for e in reqs),
            latency_p50_s=p50,
            latency_p95_s=p95,
            latency_p99_s=p99,
            audits=len(audits),
            audit_mismatches=sum(e[4] for e in audits),
            health_checks=len(checks),
            health_failures=sum(not e[4] for e in checks),
            inflight_mean=sum(samples) / len(samples) if samples else 0.0,
        )
        assert len(window) <= window_s / res + 2
