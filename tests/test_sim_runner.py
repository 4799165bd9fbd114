"""A checked simulation end to end, on small key-value protocols of the tests' own."""

from __future__ import annotations

import json

import pytest
from sim_toykv import LocalKV, PrimaryKV
from twlb.sim.history import EventType, parse_edn
from twlb.sim.runner import Fault, SimConfig, Simulation


def run(algorithm, **kwargs):
    config = SimConfig(algorithm="toy", nodes=3, duration=kwargs.pop("duration", 10.0), **kwargs)
    sim = Simulation(config, algorithm=algorithm)
    return sim, sim.finish()


def test_correct_protocol_passes_every_check():
    sim, report = run(PrimaryKV, seed=1)
    checks = report["checks"]
    assert checks["linearizability"]["verdict"] == "ok"
    assert checks["progress"]["verdict"] == "ok"
    assert report["operations"]["ok"] > 100
    assert report["commit_latency_ms"]["count"] > 0
    assert report["messages"]["client_requests"] >= report["operations"]["total"]
    json.dumps(report)  # the --output file is plain JSON


def test_unreplicated_protocol_is_caught_by_the_linearizability_check():
    _sim, report = run(LocalKV, seed=2)
    assert report["checks"]["linearizability"]["verdict"] == "violation"
    assert report["checks"]["linearizability"]["failing_prefix"]
    assert report["passed"] is False


def test_lost_primary_is_caught_by_the_progress_check():
    faults = [Fault(2.0, "crash-stop", ("node_0",))]
    _sim, report = run(PrimaryKV, seed=3, faults=faults, duration=20.0)
    progress = report["checks"]["progress"]
    assert progress["verdict"] == "violation" and progress["first_completion_after"] is None


def test_client_timeouts_become_unknown_outcomes_under_a_new_process():
    faults = [Fault(2.0, "crash", ("node_0",)), Fault(4.0, "recover", ("node_0",))]
    sim, report = run(PrimaryKV, seed=4, faults=faults, duration=16.0)
    infos = [e for e in sim.history if e.type is EventType.INFO]
    assert infos and report["operations"]["info"] == len(infos)
    for info in infos:
        later = [e for e in sim.history if e.process == info.process and e.time > info.time]
        assert later == []  # that process number is never used again
    assert report["checks"]["linearizability"]["verdict"] == "ok"
    assert report["checks"]["progress"]["verdict"] == "ok"


def test_history_exports_as_edn_and_reads_back():
    sim, _report = run(PrimaryKV, seed=5, duration=3.0)
    back = parse_edn(sim.history.to_edn())
    assert [(e.process, e.type, e.f, e.key, e.value) for e in back] == [
        (e.process, e.type, e.f, e.key, e.value) for e in sim.history
    ]


def test_same_seed_same_report():
    faults = [Fault(1.0, "partition", (("node_0",), ("node_1", "node_2"))), Fault(3.0, "heal")]
    reports = [run(PrimaryKV, seed=9, faults=faults, packet_loss=0.05)[1] for _ in range(2)]
    for r in reports:
        r.pop("wall_seconds")
        r.pop("deliveries_per_wall_second")
        r["checks"]["linearizability"].pop("seconds")
    assert reports[0] == reports[1]


def test_scripted_faults_through_the_python_api():
    sim = Simulation(
        SimConfig(algorithm="toy", nodes=3, duration=20.0, seed=6), algorithm=PrimaryKV
    )
    sim.run_until(3.0)
    sim.network.fail_node("node_1")
    sim.network.create_partition({"node_0"}, {"node_2"})
    sim.run_until(6.0)
    sim.network.heal()
    sim.network.recover_node("node_1")
    report = sim.finish()
    assert [a for _t, a, _d in sim.network.log if a != "latency"] == [
        "crash",
        "partition",
        "heal",
        "recover",
    ]
    assert report["checks"]["progress"]["healed_at"] == 6.0
    assert report["passed"]


def test_visualize_draws_topology_timeline_and_message_chart(tmp_path):
    from sim_pingnode import PingNode
    from twlb.sim.visualize import draw_all, network_state_at

    faults = [
        Fault(0.5, "partition", (("node_0",), ("node_1", "node_2"))),
        Fault(0.8, "crash", ("node_2",)),
        Fault(1.5, "heal"),
        Fault(1.6, "recover", ("node_2",)),
    ]
    sim = Simulation(
        SimConfig(
            algorithm="toy", nodes=3, duration=2.0, seed=1, faults=faults, trace=True, clients=1
        ),
        algorithm=PingNode,
    )
    sim.finish()
    down, partitions = network_state_at(sim, 1.0)
    assert down == {"node_2"} and partitions == [
        (frozenset({"node_0"}), frozenset({"node_1", "node_2"}))
    ]
    assert network_state_at(sim, 1.7) == (set(), [])
    paths = draw_all(sim, tmp_path)
    assert [p.name.split("-")[-1] for p in paths] == [
        "topology.png",
        "timeline.png",
        "messages.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("algorithm, nodes", [("raft", 5), ("paxos", 5), ("pbft", 4)])
def test_every_algorithm_survives_a_crash_and_a_partition_through_the_cli(
    tmp_path, algorithm, nodes
):
    from click.testing import CliRunner
    from twlb.sim.cli import command

    faults = '[[2,"crash",["node_0"]],[4,"partition",[["node_1"],["node_2","node_3"]]],[6,"heal",[]],[7,"recover",["node_0"]]]'
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        command,
        [
            "--algorithm",
            algorithm,
            "--nodes",
            str(nodes),
            "--duration",
            "20",
            "--seed",
            "3",
            "--faults",
            faults,
            "--output",
            str(out),
            "--history",
            str(tmp_path / "h.edn"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {c["verdict"] for c in report["checks"].values()} == {"ok"}
    assert report["leader_changes"] >= 1 and report["operations"]["ok"] > 50
    assert parse_edn((tmp_path / "h.edn").read_text()).events


def test_pbft_clients_accept_only_answers_vouched_for_by_f_plus_one_replicas():
    config = SimConfig(
        algorithm="pbft", nodes=4, duration=15.0, seed=2, byzantine={"node_2": "wrong-answer"}
    )
    report = Simulation(config).finish()
    assert report["checks"]["linearizability"]["verdict"] == "ok"
    assert report["checks"]["invariants"]["verdict"] == "ok"
    assert report["operations"]["ok"] > 50


def test_a_run_the_checker_cannot_decide_is_undecided_not_a_violation():
    _sim, report = run(PrimaryKV, seed=1, max_check_states=1)
    assert report["checks"]["linearizability"]["verdict"] == "unknown"
    assert report["outcome"] == "undecided" and report["passed"] is False


def test_the_timeline_ends_a_leaders_bar_when_it_steps_down():
    from twlb.sim.visualize import STEP_DOWN_EVENTS, leader_intervals

    # The leader is cut off alone: check-quorum makes it step down about 0.6 s later,
    # after (or before) the majority elects another.
    sim = Simulation(SimConfig(algorithm="raft", nodes=5, seed=2, duration=8.0))
    sim.run_until(2.0)
    leader = sim.arena.leader()
    sim.network.isolate(leader)
    sim.run_until(5.0)
    sim.network.heal()
    sim.finish()
    intervals = leader_intervals(sim)
    step_downs = {
        node: sorted(
            t
            for t, n, e in sim.kernel.events
            if n == node and (e[0] in STEP_DOWN_EVENTS or (e[0] == "role" and e[1] != "leader"))
        )
        for node in sim.node_ids
    }
    for node, start, stop, _term in intervals:
        own = [t for t in step_downs[node] if t > start]
        assert stop == min([sim.config.duration, *own[:1]])
    cut_off = next(iv for iv in intervals if iv[0] == leader and iv[1] < 2.0)
    successor = next(iv for iv in intervals if iv[1] > 2.0)
    # It stepped down by itself (check-quorum), about when the others elected another.
    assert cut_off[2] in step_downs[leader] and 2.0 < cut_off[2] < 3.5
    assert successor[0] != leader and successor[2] > cut_off[2]


def test_the_message_chart_shows_every_message_of_the_window_it_names(tmp_path):
    from twlb.sim.visualize import MSC_MAX_MESSAGES, draw_message_sequence, message_window

    sim = Simulation(SimConfig(algorithm="raft", nodes=5, seed=3, duration=4.0, trace=True))
    sim.finish()
    sends = [e for e in sim.kernel.trace if e[1] == "send"]
    start, stop, rows = message_window(sim, (0.5, 1.0))
    assert (start, stop) == (0.5, 1.0)
    assert len(rows) == sum(1 for e in sends if 0.5 <= e[0] <= 1.0)
    deliveries = {(e[0], e[2], e[3]) for e in sim.kernel.trace if e[1] == "deliver"}
    arrows = [r for r in rows if r[1] is not None]
    assert arrows and all((r[1], r[2], r[3]) in deliveries and r[1] > r[0] for r in arrows)
    # A window holding more than the chart can show is narrowed, and named as narrowed.
    start, stop, rows = message_window(sim, (0.0, 3.0))
    assert len(sends) > MSC_MAX_MESSAGES and stop < 3.0
    assert len(rows) <= MSC_MAX_MESSAGES
    assert len(rows) == sum(1 for e in sends if 0.0 <= e[0] <= stop)
    assert any(e[0] > stop for e in sends if e[0] <= 3.0)
    path = draw_message_sequence(sim, tmp_path / "msc.png", (0.5, 1.0))
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"


def test_the_cli_exits_3_for_an_undecided_run_and_1_stays_for_violations(tmp_path):
    from click.testing import CliRunner
    from twlb.sim.cli import command

    args = ["--nodes", "3", "--duration", "5", "--seed", "1"]
    undecided = CliRunner().invoke(command, [*args, "--max-check-states", "1"])
    assert undecided.exit_code == 3, undecided.output
    assert "check linearizability: unknown" in undecided.output
    decided = CliRunner().invoke(command, args)
    assert decided.exit_code == 0, decided.output
    broken = CliRunner().invoke(
        command,
        [*args, "--bug", "double-vote", "--duration", "20", "--progress-within", "8"]
        + ["--nodes", "5", "--faults", '[[1,"leader-crash",[9,0]]]', "--max-check-states", "1"],
    )
    assert broken.exit_code == 1, broken.output  # a violation outranks an undecided check


def test_a_bad_message_chart_window_is_refused_in_one_line():
    from click.testing import CliRunner
    from twlb.sim.cli import command

    result = CliRunner().invoke(command, ["--duration", "2", "--msc-window", "2", "1"])
    assert result.exit_code == 2 and "--msc-window needs START < END" in result.output
    assert "Traceback" not in result.output
