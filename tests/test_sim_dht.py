"""Checked runs and sweeps of the replicated hash table (`twlb sim dht`): each check
passes on the correct table and can fail, undecided is its own outcome."""

from __future__ import annotations

import json

from click.testing import CliRunner
from twlb.sim.cli import command
from twlb.sim.dht_run import DhtRunConfig, DhtSimulation, DhtSweepSettings, OpRecord, dht_sweep
from twlb.sim.runner import Fault
from twlb.sim.sweep import exit_status


def run(**config) -> tuple[DhtSimulation, dict]:
    sim = DhtSimulation(DhtRunConfig(duration=8.0, settle=6.0, **config))
    return sim, sim.finish()


def test_a_strict_run_under_crashes_partitions_and_skew_passes_every_check() -> None:
    faults = [
        Fault(1.0, "crash", ("node_1",)),
        Fault(1.5, "crash", ("node_4",)),
        Fault(2.0, "partition", (("node_0", "node_2"), ("node_3", "node_5"))),
        Fault(3.0, "skew", ("node_3", -1.0, 0.5)),
        Fault(4.0, "heal"),
        Fault(5.0, "recover", ("node_1",)),
        Fault(5.5, "recover", ("node_4",)),
    ]
    _sim, report = run(faults=faults, seed=3)
    assert report["outcome"] == "passed", report["checks"]
    assert {c["verdict"] for c in report["checks"].values()} == {"ok"}
    assert report["writes_acknowledged"] > 10 and report["reads_ok"] > 10
    assert report["checks"]["convergence"]["hints_left"] == 0
    json.dumps(report)


def test_a_lost_write_is_found() -> None:
    sim, _report = run(seed=4)
    table = sim.table()
    victim = next(op for op in sim.ops if op.f == "write" and op.outcome == "ok" and op.value)
    assert sim.lost_writes(table) == []
    for node in sim.kernel.nodes.values():  # every disk loses that key
        node.store.pop(victim.key, None)
    table = sim.table()
    assert victim in sim.lost_writes(table)


def test_stale_reads_are_judged_by_real_time_alone() -> None:
    sim, _report = run(seed=5)
    a = OpRecord("c1", "write", "x", "a", 1.0, 1.2, "ok", ())
    b = OpRecord("c2", "write", "x", "b", 1.5, 1.7, "ok", ())
    late = OpRecord("c3", "write", "x", "c", 1.9, None, "info")
    sim.ops = [
        a,
        b,
        late,
        OpRecord("c4", "read", "x", "a", 2.0, 2.1, "ok", ()),  # b was acknowledged: stale
        OpRecord("c4", "read", "x", "b", 2.2, 2.3, "ok", ()),
        OpRecord("c5", "read", "x", "a", 1.6, 1.8, "ok", ()),  # concurrent with b: fine
        OpRecord("c6", "read", "x", None, 2.4, 2.5, "ok", ()),  # nothing deleted x: stale
        OpRecord("c6", "read", "x", "c", 2.6, 2.7, "ok", ()),  # an unknown outcome's: fine
    ]
    assert [(r.value, r.invoked) for r in sim.stale_reads()] == [("a", 2.0), (None, 2.4)]


def test_sloppy_mode_counts_stale_reads_without_calling_them_violations() -> None:
    settings = DhtSweepSettings(mode="sloppy", nemeses=("partition",), episodes=6, duration=10.0)
    results = dht_sweep(settings, range(4))
    assert all(r["outcome"] == "passed" for r in results), results
    assert all(r["lost_writes"] == 0 for r in results)
    _sim, report = run(mode="sloppy", seed=1)
    assert report["checks"]["linearizability"]["verdict"] == "not-applicable"
    assert report["checks"]["stale_reads"]["verdict"] == "not-applicable"


def test_an_undecided_check_is_its_own_outcome() -> None:
    _sim, report = run(seed=2, max_check_states=1)
    assert report["checks"]["linearizability"]["verdict"] == "unknown"
    assert report["outcome"] == "undecided" and not report["passed"]
    summary = {"violations": 0, "undecided": 1}
    assert exit_status(summary) == 3
    assert exit_status({"violations": 1, "undecided": 1}) == 1


def test_the_broken_variants_are_caught() -> None:
    """Each variant against its own seeds (`docs/simulator-nemesis.md` has the table)."""
    for bug, nemeses, check in (
        ("stand-in-acks", ("partition",), "linearizability"),
        ("wall-clock-versions", ("skew",), "linearizability"),
    ):
        settings = DhtSweepSettings(nemeses=nemeses, episodes=6, duration=10.0, bug=bug)
        results = dht_sweep(settings, range(6))
        caught = [r for r in results if r["outcome"] == "violation"]
        assert caught and check in caught[0]["failed_checks"], (bug, results)
        correct = DhtSweepSettings(nemeses=nemeses, episodes=6, duration=10.0)
        assert dht_sweep(correct, [caught[0]["seed"]])[0]["outcome"] == "passed"


def test_the_cli_sweeps_and_writes_json(tmp_path) -> None:
    out = tmp_path / "dht.json"
    result = CliRunner().invoke(
        command, ["dht", "--runs", "2", "--duration", "6", "--settle", "5", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["summary"]["runs"] == 2 and data["summary"]["lost_writes"] == 0
    assert "W=2 Rq=2" in result.output


def test_the_cli_refuses_bad_input_in_one_line() -> None:
    for args, message in (
        (["--write-quorum", "1", "--read-quorum", "1"], "strict mode needs"),
        (["--nemesis", "leader-crash"], "does not apply to the hash table"),
        (["--nodes", "2"], "cannot hold 3 replicas"),
        (["--bug", "nonsense"], "unknown dht bug"),
    ):
        result = CliRunner().invoke(command, ["dht", "--runs", "1", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_the_cli_exits_3_when_a_run_is_undecided() -> None:
    result = CliRunner().invoke(
        command, ["dht", "--runs", "1", "--duration", "6", "--max-check-states", "1"]
    )
    assert result.exit_code == 3, result.output
    assert "UNDECIDED" in result.output


def test_a_sweep_never_has_more_than_n_minus_1_nodes_down_at_once() -> None:
    settings = DhtSweepSettings(nemeses=("crash", "ack-crash"), mix=True, episodes=8)
    for seed in range(4):
        config, _ = settings.config(seed)
        sim = DhtSimulation(config)
        sim.finish()
        down, most = set(), 0
        for _t, action, detail in sim.network.log:
            if action == "crash":
                down.add(detail)
            elif action == "recover":
                down.discard(detail)
            most = max(most, len(down))
        assert 1 <= most <= 2, (seed, most)
