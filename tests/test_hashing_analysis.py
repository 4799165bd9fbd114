"""The hashing analyses' measurements of the sans-IO cores, and the command's input checks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from twlb.orchestration.hashing_analysis import BALANCE_FACTOR, bounded_loads, key_movement, spread

from twlb.cli import main


def test_key_movement_is_near_one_nth_for_every_algorithm() -> None:
    rows = key_movement(3000, seed=1)
    assert {r["algorithm"] for r in rows} == {"ring (160 vnodes)", "jump", "rendezvous", "maglev"}
    for r in rows:
        # 3,000 keys: sampling noise about 1%; the ring and Maglev trade a little more.
        slack = 0.03 if r["algorithm"] in ("jump", "rendezvous") else 0.07
        assert abs(r["moved_on_join"] - r["ideal"]) < slack, r
        assert abs(r["moved_on_leave"] - r["ideal"]) < slack, r


def test_bounded_loads_stay_under_the_bound_on_uniform_and_skewed_keys() -> None:
    out = bounded_loads(5, 3000, seed=2)
    for case in ("uniform/9", "uniform/160", "zipf-1.1/9", "zipf-1.1/160"):
        row = out[case]
        assert row["bounded_max_over_bound_at_any_time"] <= 1.0, case
        assert row["bounded_max_over_mean"] <= BALANCE_FACTOR + 5 / 3000, case
    # Skew is what the bound is for: the plain ring overloads a server with hot keys.
    assert out["zipf-1.1/9"]["ring_max_over_mean"] > BALANCE_FACTOR


def test_spread_of_loads() -> None:
    assert spread([10, 10, 10]) == {"mean": 10.0, "cv": 0.0, "max_over_mean": 1.0}
    assert spread([0, 20])["max_over_mean"] == 2.0


def test_the_command_refuses_too_few_requests_with_status_2() -> None:
    result = CliRunner().invoke(main, ["hashing", "--requests", "5", "--out", "x"])
    assert result.exit_code == 2 and "--requests" in result.output


def test_a_cluster_whose_ports_were_taken_is_started_again_on_other_free_ports() -> None:
    from twlb.orchestration.hashing_analysis import start_cluster
    from twlb.processes.state import ClusterError

    tried: list[int] = []

    class Cluster:
        name = "a1"

        def __init__(self, base: int) -> None:
            self.base = base

        def start(self) -> Cluster:
            tried.append(self.base)
            if len(tried) < 3:
                raise ClusterError(f"port in use: balancer port {self.base}")
            return self

    started = start_cluster(Cluster, port_base=0, offset=0, count=8)
    assert started.base == tried[-1] and len(set(tried)) == 3
    # Fixed ports are the user's choice: one try, and a one-line reason.
    tried.clear()
    with pytest.raises(ClusterError, match="pick another --port-base"):
        start_cluster(Cluster, port_base=20000, offset=10, count=8)
    assert tried == [20010]


def test_each_analysis_is_saved_as_it_finishes_and_a_partial_report_reads(tmp_path) -> None:
    from twlb.orchestration.hashing_analysis import markdown, save

    results = {"command": "twlb hashing", "concurrency": 64, "baseline": {}}
    save(tmp_path, results)
    assert json.loads((tmp_path / "hashing.json").read_text()) == results
    results["bounded_load"] = bounded_loads(5, 500, seed=1)
    results["error"] = "stopped: interrupted"
    save(tmp_path, results)
    text = (tmp_path / "hashing.md").read_text()
    assert text == markdown(results)
    assert "still running or stopped" in text and "Bounded loads in the sans-IO core" in text
    assert "## Stopped early" in text and "A-1" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hashing.json", "hashing.md"]
