"""The fleet (sans-IO): one record per backend, in join order, and the list of those up."""

from __future__ import annotations

import pytest
from twlb.balancer.fleet import Fleet

from twlb.outcome import Outcome


def fleet(*urls: str) -> Fleet:
    f = Fleet(window_s=2.0, resolution_s=0.25)
    for url in urls:
        f.add(url, pool=f"pool of {url}", counters=f"counters of {url}", up=True)
    return f


def test_records_hold_a_backends_parts_and_keep_the_order_backends_joined() -> None:
    f = fleet("a", "b")
    c = f.add("c", pool="pool of c", counters="counters of c")
    assert f.urls == ["a", "b", "c"] and [r.url for r in f] == ["a", "b", "c"]
    assert (c.pool, c.counters, c.inflight, c.features, c.up) == (
        "pool of c",
        "counters of c",
        0,
        None,
        False,  # joins the rotation at the next set_up, as a change
    )
    assert f.get("c") is c and f["c"] is c and "c" in f and len(f) == 3
    assert f.get("z") is None and "z" not in f
    assert f["a"].window is not f["b"].window  # a window each
    with pytest.raises(ValueError, match="already in the fleet"):
        f.add("a", pool=None, counters=None)


def test_a_removed_record_leaves_every_list_and_knows_it_left() -> None:
    f = fleet("a", "b", "c")
    rec = f.remove("b")
    assert rec is not None and not rec.in_fleet
    assert f.urls == ["a", "c"] and f.up == ["a", "c"] and "b" not in f
    assert f.remove("b") is None
    again = f.add("b", pool=None, counters=None)  # a new record, at the end
    assert again is not rec and again.in_fleet and f.urls == ["a", "c", "b"]


def test_set_up_reports_who_left_and_joined_and_keeps_the_list_while_nothing_changes() -> None:
    f = fleet("a", "b", "c")
    up = f.up
    assert f.set_up(["a", "b", "c"]) == ([], [])
    assert f.up is up  # the same list: routing's caches keyed on it stay valid
    assert f.set_up(["a", "c"]) == (["b"], [])
    assert f.up == ["a", "c"] and f.up is not up and not f["b"].up
    f.add("d", pool=None, counters=None)
    assert f.set_up(["b", "c", "d"]) == (["a"], ["b", "d"])
    assert [r.up for r in f] == [False, True, True, True]


def test_features_are_the_fleets_and_land_on_each_record() -> None:
    f = fleet("a", "b")
    f["a"].window.record_request(1.0, Outcome.SUCCESS, 0.010)
    f["a"].window.record_request(1.0, Outcome.SUCCESS, 0.010)
    f["b"].window.record_request(1.0, Outcome.ERROR, 0.040)
    rows = f.features(1.5)
    assert set(rows) == {"a", "b"}
    assert f["a"].features is rows["a"] and f["b"].features is rows["b"]
    assert rows["b"]["error_5xx_ratio"] == 1.0 and rows["a"]["success_ratio"] == 1.0
    # relative latency is relative to this fleet's median p50
    assert rows["b"]["latency_p50_rel"] > 1.0 > rows["a"]["latency_p50_rel"]


def test_in_flight_counts_are_sampled_into_each_window() -> None:
    f = fleet("a", "b")
    f["a"].inflight = 3
    f.sample_inflight(1.0)
    f["a"].inflight = 1
    f.sample_inflight(1.1)
    stats = {r.url: r.window.stats(1.2) for r in f}
    assert stats["a"].inflight_mean == 2.0 and stats["b"].inflight_mean == 0.0
