"""The collector: seeded run plans, ground-truth labelling, and a live run read two ways."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from twlb.balancer.features import FEATURE_NAMES
from twlb.chaos.run import TruthTimeline, driven_load
from twlb.ml.dataset import read_dataset, write_rows
from twlb.orchestration.collect import (
    SOURCES,
    collect_attached,
    collection_metadata,
    plan_run,
    run_live,
)
from twlb.orchestration.prometheus import LocalPrometheus, find_prometheus, render_config

from twlb.cli import main
from twlb.spec import FaultType, NodeClass, assign_faults


def test_same_seed_gives_the_same_run_and_other_seeds_vary_faults_load_and_chaos() -> None:
    assert plan_run(11) == plan_run(11)
    plans = [plan_run(s) for s in range(30)]
    assert len({p.rate for p in plans}) > 10
    assert len({p.audit_fraction for p in plans}) > 10
    drawn = {f.type for p in plans for f in p.faults} | {
        e.fault.type for p in plans for e in p.events if e.fault
    }
    assert drawn >= {FaultType.DELAY, FaultType.ERROR, FaultType.BYZANTINE, FaultType.CRASH}
    for p in plans:
        actions = [e.action for e in p.events]
        assert "fault" in actions and "kill" in actions
        assert all(0 < e.at_s < p.duration_s for e in p.events)
        # The cluster the run starts carries exactly the planned faults (the ground truth).
        nodes = assign_faults(p.cluster().spec, p.run_id)
        assert [n.fault for n in nodes] == list(p.faults)


def test_plan_draws_fleet_size_and_rate_from_ranges_per_seed() -> None:
    plans = [plan_run(s, backends=(3, 6), rate=(30, 260)) for s in range(40)]
    assert {p.backends for p in plans} == {3, 4, 5, 6}
    assert all(30 <= p.rate <= 260 and len(p.faults) == p.backends for p in plans)
    assert plan_run(5, backends=(3, 6), rate=(30, 260)) == plans[5]  # replayable by seed
    fixed = plan_run(5, backends=4, rate=75.0)
    assert (fixed.backends, fixed.rate) == (4, 75.0)


def test_plan_refuses_fewer_than_three_backends() -> None:
    with pytest.raises(ValueError, match="at least 3 backends"):
        plan_run(1, backends=2)


def test_a_window_that_straddles_a_change_of_truth_gets_no_label() -> None:
    truth = TruthTimeline()
    truth.observe("n", 0.0, "healthy", "benign")
    truth.observe("n", 1.0, "healthy", "benign")  # no change: not a new entry
    truth.observe("n", 10.0, "error", "error")
    assert truth.stable("n", 2.0, 9.0) == ("healthy", "benign")
    assert truth.stable("n", 8.0, 11.0) is None
    assert truth.stable("n", 10.5, 20.0) == ("error", "error")
    assert truth.stable("unknown", 0.0, 1.0) is None


def test_prometheus_config_scrapes_each_balancer_at_the_given_interval() -> None:
    cfg = render_config(["http://127.0.0.1:9000"], 0.15)
    job = cfg["scrape_configs"][0]
    assert job["scrape_interval"] == "150ms" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9000"]
    with pytest.raises(ValueError, match="http"):
        render_config(["127.0.0.1:9000"], 0.15)


def test_live_run_gives_the_same_labelled_rows_from_the_balancer_and_prometheus(
    tmp_path: Path,
) -> None:
    # make test installs Debian's prometheus (scripts/system-deps); without it this fails.
    find_prometheus()
    plan = plan_run(7, backends=3, duration_s=12.0, window_s=2.0, rate=120.0)
    result = run_live(plan, SOURCES, workdir=tmp_path, log=lambda _: None)
    direct, scraped = result.rows["balancer"], result.rows["prometheus"]
    assert len(direct) >= 8, direct
    assert direct == scraped
    assert {r.node for r in direct} == {f"{plan.run_id}-node-{i}" for i in range(3)}
    labels = {r.label for r in direct}
    assert NodeClass.HEALTHY.value in labels and len(labels) >= 2
    faulty = [r for r in direct if r.label != NodeClass.HEALTHY.value]
    assert any(r.features != faulty[0].features for r in direct)
    # The rows round-trip through the Parquet file the trainer reads.
    path = write_rows(
        tmp_path / "rows.parquet",
        direct,
        FEATURE_NAMES,
        collection_metadata("balancer", 2.0, [plan]),
    )
    ds = read_dataset(path, FEATURE_NAMES)
    assert sorted(ds.rows(), key=lambda r: r.key()) == sorted(direct, key=lambda r: r.key())
    assert ds.metadata["source"] == "balancer"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prometheus", "http://127.0.0.1:9"], "--prometheus needs --control-token"),
        (["--control-token", "t"], "need --prometheus URL"),
        (["--backends", "2"], "Invalid value for '--backends'"),
        (["--backends", "6-3"], "needs integers LO <= HI"),
        (["--rate", "fast"], "'fast' is neither a number nor a range LO-HI"),
        (["--prometheus", "http://127.0.0.1:9", "--control-token", "t", "--source", "balancer"],
         "drop --source balancer"),
    ],
)  # fmt: skip
def test_collect_flags_that_do_not_fit_exit_with_status_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["collect", "--out", str(tmp_path / "x.parquet"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_attached_collection_labels_a_running_balancers_windows_from_prometheus(
    spawn, tmp_path: Path
) -> None:
    token = "control-secret"
    quiet = ("--log-level", "warning", "--control-token", token, "--no-simulation")
    started = [spawn("backend", "--node-id", f"n{i}", *quiet, wait=False) for i in range(2)]
    started.append(spawn("backend", "--node-id", "n2", "--fault-type", "error", *quiet, wait=False))
    for proc, url in started:
        proc.wait_ready(url + "/healthz")
    nodes = [url for _, url in started]
    _, balancer = spawn(
        "balancer", "--window", "2", "--log-level", "warning",
        *(a for n in nodes for a in ("--backend", n)),
    )  # fmt: skip
    with (
        driven_load(balancer, 100.0, 25.0, tmp_path),
        LocalPrometheus([balancer], 0.2, workdir=tmp_path / "prometheus") as prom,
    ):
        rows = collect_attached(
            prom.url, token, duration_s=9.0, window_s=2.0, run_id="lab", seed=40,
            segments=1, log=lambda _: None,
        )  # fmt: skip
    assert len(rows) >= 6
    assert {r.run_id for r in rows} == {"lab-0"} and {r.seed for r in rows} == {40}
    by_node = {r.node: r.label for r in rows}
    assert by_node == {nodes[0]: "healthy", nodes[1]: "healthy", nodes[2]: "error"}
    error = FEATURE_NAMES.index("error_5xx_ratio")
    assert all(r.features[error] > 0.5 for r in rows if r.label == "error")
