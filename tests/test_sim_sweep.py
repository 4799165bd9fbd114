"""Sweeps of random fault schedules: schedule generation, violations found, schedules
shrunk to what still breaks the run, and replay commands that carry the schedule."""

from __future__ import annotations

import random
import shlex
from dataclasses import replace

from sim_toykv import ForgetfulKV, PrimaryKV
from twlb.sim.cli import parse_faults
from twlb.sim.sweep import (
    SweepSettings,
    failed_checks,
    random_schedule,
    replay_command,
    run_config,
    shrink,
    summarise,
    sweep,
)

NODES = [f"node_{i}" for i in range(5)]


def test_schedules_stay_in_window_and_never_crash_more_than_tolerated():
    for seed in range(200):
        rng = random.Random(seed)
        episodes = random_schedule(
            rng, NODES, 2, ["partition", "crash", "loss", "pause", "skew"], 1.0, 19.0, 6
        )
        intervals = []
        for episode in episodes:
            assert all(1.0 <= f.at <= 19.0 for f in episode)
            if episode[0].action == "crash":
                assert episode[1].action == "recover" and episode[1].args == episode[0].args
                intervals.append((episode[0].at, episode[1].at))
        for t in [x for iv in intervals for x in iv]:
            assert sum(1 for s, e in intervals if s <= t <= e) <= 2  # f = 2 of 5


def test_sweep_of_a_correct_protocol_finds_nothing():
    settings = SweepSettings(
        algorithm="toy",
        nodes=3,
        duration=14.0,
        progress_within=5.0,
        nemeses=("partition", "loss", "crash", "pause"),
    )
    results = sweep(settings, range(6), algorithm=PrimaryKV)
    summary = summarise(results, 1.0)
    assert summary["runs"] == 6 and summary["violations"] == 0, results
    assert summary["faults_injected"] > 0 and summary["operations_ok"] > 0


def test_violation_is_shrunk_to_the_crash_that_causes_it():
    settings = SweepSettings(
        algorithm="toy",
        nodes=3,
        duration=14.0,
        progress_within=5.0,
        nemeses=("partition", "loss", "crash"),
        episodes=5,
    )
    results = sweep(settings, range(30), algorithm=ForgetfulKV)
    failing = [r["seed"] for r in results if not r["passed"]]
    assert failing, "crashing the primary of a protocol that persists nothing must be caught"
    config, schedule = settings.config(failing[0])
    minimal, report = shrink(config, schedule, algorithm=ForgetfulKV)
    assert failed_checks(report) == ["linearizability"]
    assert 1 <= len(minimal) <= len(schedule)
    assert any(ep[0].action == "crash" and ep[0].args == ("node_0",) for ep in minimal)
    for i in range(len(minimal)):  # minimal: dropping any remaining episode makes it pass
        trial = minimal[:i] + minimal[i + 1 :]
        faults = sorted((f for ep in trial for f in ep), key=lambda f: f.at)
        assert not failed_checks(run_config(replace(config, faults=faults), ForgetfulKV))


def test_replay_command_carries_the_exact_schedule():
    settings = SweepSettings(nemeses=("partition", "crash", "loss"))
    config, _schedule = settings.config(17)
    words = shlex.split(replay_command(config))
    assert words[:2] == ["twlb", "sim"]
    faults = parse_faults(words[words.index("--faults") + 1])
    assert faults == config.faults
    assert words[words.index("--seed") + 1] == "17"


def test_same_seed_same_schedule():
    settings = SweepSettings(nemeses=("partition", "crash", "loss", "skew"))
    assert settings.config(5)[0].faults == settings.config(5)[0].faults
    assert settings.config(5)[0].faults != settings.config(6)[0].faults


def test_sweep_catches_a_raft_that_grants_two_votes_in_one_term_within_ten_seeds():
    settings = SweepSettings(
        algorithm="raft", duration=12.0, progress_within=4.0, protocol={"bug": "double-vote"}
    )
    results = sweep(settings, range(10))
    failing = [r for r in results if not r["passed"]]
    assert failing, "the double-vote Raft must be caught within 10 seeds"
    config, schedule = settings.config(failing[0]["seed"])
    minimal, report = shrink(config, schedule, budget=6)
    assert failed_checks(report)
    assert "--bug double-vote" in replay_command(replace(config, faults=[]))


def test_undecided_runs_are_counted_apart_and_exit_3():
    from click.testing import CliRunner
    from twlb.sim.cli import command

    result = CliRunner().invoke(
        command,
        ["sweep", "--runs", "2", "--duration", "12", "--progress-within", "4"]
        + ["--max-check-states", "1", "--no-shrink"],
    )
    assert result.exit_code == 3, result.output
    assert "UNDECIDED" in result.output and "VIOLATION" not in result.output
    settings = SweepSettings(duration=12.0, progress_within=4.0, max_check_states=1)
    summary = summarise(sweep(settings, range(2)), 1.0)
    assert (summary["violations"], summary["undecided"]) == (0, 2)
    assert summary["undecided_seeds"] == [0, 1] and summary["failing_seeds"] == []
