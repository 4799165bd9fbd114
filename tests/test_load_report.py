"""The load report's arithmetic: percentiles, achieved rate, merging workers' tallies."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.client.client import CallStatus
from twlb.client.report import LoadTally, achieved_rate, build_report, latency_summary

latencies = st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=2, max_size=300)


@settings(max_examples=100, deadline=None)
@given(latencies)
def test_percentiles_match_linear_interpolation(samples: list[float]) -> None:
    s = latency_summary(array("d", samples))
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    assert s["p50"] == pytest.approx(p50, abs=1e-3)
    assert s["p95"] == pytest.approx(p95, abs=1e-3)
    assert s["p99"] == pytest.approx(p99, abs=1e-3)
    assert s["max"] == pytest.approx(max(samples), abs=1e-3)
    assert s["count"] == len(samples)


def test_no_samples_give_no_percentiles() -> None:
    assert latency_summary(array("d")) == {
        "p50": None, "p95": None, "p99": None, "max": None, "mean": None, "count": 0,
    }  # fmt: skip


def _tally(sends: list[float], rate: float) -> LoadTally:
    t = LoadTally()
    for at in sends:
        t.record_send(at, max(0.0, at - len(t.latency_all_ms) / rate))
        t.record_result(CallStatus.OK, 1.0)
    return t


def test_a_generator_on_schedule_achieves_exactly_its_rate() -> None:
    rate = 200.0
    t = _tally([i / rate for i in range(400)], rate)
    assert achieved_rate(t, rate) == pytest.approx(rate)


def test_a_late_start_that_catches_up_is_not_rewarded() -> None:
    rate = 100.0
    sends = [0.3] * 31 + [i / rate for i in range(31, 200)]  # first 31 sent in a burst
    assert achieved_rate(_tally(sends, rate), rate) == pytest.approx(rate)


def test_a_generator_that_falls_behind_scores_below_its_rate() -> None:
    rate = 100.0
    sends = [i / 90.0 for i in range(200)]  # only keeps 90/s
    assert achieved_rate(_tally(sends, rate), rate) == pytest.approx(90.0, rel=0.01)


def test_merging_worker_tallies_counts_everything_once() -> None:
    a, b = LoadTally(), LoadTally()
    for i in range(10):
        (a if i % 2 == 0 else b).record_send(i / 10, 0.0)
    for s in (CallStatus.OK, CallStatus.OK, CallStatus.TIMEOUT, CallStatus.WRONG, CallStatus.OK):
        a.record_result(s, 2.0)
    for s in (CallStatus.OK, CallStatus.HTTP_5XX, CallStatus.OK, CallStatus.OK, CallStatus.OK):
        b.record_result(s, 4.0)
    b.partial, b.stop_reason = True, "interrupted"
    a.merge(b)
    r = build_report(a, {"rate": 10.0, "mode": "basic", "url": "http://127.0.0.1:1"})
    assert (r["sent"], r["correct"], r["wrong"], r["failed"]) == (10, 7, 1, 2)
    assert r["failed_by_reason"]["timeout"] == 1 and r["failed_by_reason"]["http_5xx"] == 1
    assert r["partial"] is True and r["stop_reason"] == "interrupted"
    assert r["latency_all_ms"]["count"] == 10 and r["latency_ms"]["count"] == 7
    assert r["achieved_rate"] == pytest.approx(10.0)
