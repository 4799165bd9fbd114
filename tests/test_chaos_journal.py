"""Chaos journals to labels: intervals from activity outputs, windows labelled by overlap."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twlb.chaos.journal import (
    KILLED_FAULT,
    FeatureWindow,
    JournalError,
    chaos_intervals,
    label_windows,
    read_journal,
    steady_state_problems,
)

from twlb.spec import NodeClass

T0 = 1_800_000_000.0


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(T0 + t, UTC).isoformat()


def _run(
    name: str, start: float, end: float, output: Any, func: str = "f", status: str = "succeeded"
) -> dict[str, Any]:
    return {
        "activity": {"type": "action", "name": name, "provider": {"type": "python", "func": func}},
        "output": output,
        "start": _stamp(start),
        "end": _stamp(end),
        "status": status,
    }


def _journal(run: list, rollbacks: list | None = None, end: float = 100.0) -> dict[str, Any]:
    return {
        "experiment": {"title": "t"},
        "start": _stamp(0.0),
        "end": _stamp(end),
        "status": "completed",
        "steady_states": {"before": {"probes": []}, "after": {"probes": []}, "during": []},
        "run": run,
        "rollbacks": rollbacks or [],
    }


def test_a_kill_lasts_until_the_node_is_restored():
    j = _journal(
        [
            _run("kill", 10, 10.1, {"node": "c-node-0", "chaos_class": "crash", "at": T0 + 10.05}),
            _run("load", 10.2, 12, {"sent": 10}),
            _run("recovered", 12, 15, {"node": "c-node-0", "restored": True, "at": T0 + 14.5}),
        ]
    )
    [i] = chaos_intervals(j)
    assert (i.node, i.label, i.fault, i.activity) == (
        "c-node-0",
        NodeClass.CRASH,
        KILLED_FAULT,
        "kill",
    )
    assert i.start == pytest.approx(T0 + 10.05) and i.end == pytest.approx(T0 + 14.5)


def test_a_fault_without_rollback_closes_at_the_journal_end_and_rollbacks_close_theirs():
    byz = {"node": "c-node-1", "chaos_class": "byzantine", "fault": {"type": "byzantine"}}
    slow = {"node": "c-node-2", "chaos_class": "delay", "fault": {"type": "delay"}}
    j = _journal(
        [_run("byz", 5, 5.1, byz), _run("slow", 6, 6.1, slow)],
        rollbacks=[_run("restore", 30, 30.2, {"node": "c-node-2", "restored": True})],
        end=40,
    )
    by_node = {i.node: i for i in chaos_intervals(j)}
    assert by_node["c-node-1"].end == pytest.approx(T0 + 40)
    assert by_node["c-node-1"].fault == "byzantine"
    # Without "at", the activity's end time is when it took effect.
    assert by_node["c-node-2"].start == pytest.approx(T0 + 6.1)
    assert by_node["c-node-2"].end == pytest.approx(T0 + 30.2)


def test_failed_actions_and_healthy_switches_open_nothing():
    j = _journal(
        [
            _run("kill", 1, 2, {"node": "n-node-0", "chaos_class": "crash"}, status="failed"),
            _run("benign", 3, 4, {"node": "n-node-0", "chaos_class": "healthy"}),
        ]
    )
    assert chaos_intervals(j) == []


def test_terminated_pods_are_crashes_of_their_nodes():
    pods = ["demo-node-3-5d8f7c9b4-x2x7q", "unrelated-pod"]
    j = _journal([_run("terminate", 8, 9, pods, func="terminate_pods")], end=20)
    [i] = chaos_intervals(j)
    assert (i.node, i.label, i.start, i.end) == ("demo-node-3", NodeClass.CRASH, T0 + 9, T0 + 20)


def test_windows_take_the_chaos_class_only_when_it_covers_enough_of_them():
    j = _journal(
        [
            _run("kill", 10, 10, {"node": "a", "chaos_class": "crash", "at": T0 + 10}),
            _run("back", 20, 20, {"node": "a", "restored": True, "at": T0 + 20}),
        ]
    )
    windows = [
        FeatureWindow("a", T0 + 5, T0 + 10),  # ends as the kill starts
        FeatureWindow("a", T0 + 9, T0 + 14),  # 4 of 5 s killed
        FeatureWindow("a", T0 + 19.5, T0 + 24.5),  # 0.5 of 5 s killed: too little
        FeatureWindow("b", T0 + 12, T0 + 17),  # another node
    ]
    assert label_windows(j, windows) == [None, NodeClass.CRASH, None, None]
    assert label_windows([j, j], windows, min_overlap=0.1)[2] is NodeClass.CRASH


def test_a_file_that_is_not_a_journal_is_named(tmp_path: Path):
    bad = tmp_path / "j.json"
    bad.write_text(json.dumps({"title": "x"}))
    with pytest.raises(JournalError, match="not a chaos journal"):
        read_journal(bad)
    with pytest.raises(JournalError, match="no such journal"):
        read_journal(tmp_path / "missing.json")


def test_the_labels_command_prints_intervals_and_names_a_bad_journal(tmp_path: Path):
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            _journal([_run("kill", 1, 2, {"node": "c-node-0", "chaos_class": "crash"})], end=9)
        )
    )
    ok = subprocess.run(
        [sys.executable, "-m", "twlb.chaos", "labels", str(good)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    [row] = json.loads(ok.stdout)
    assert (row["node"], row["label"], row["end"] - row["start"]) == ("c-node-0", "crash", 7.0)
    bad = subprocess.run(
        [sys.executable, "-m", "twlb.chaos", "labels", str(tmp_path / "missing.json")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "no such journal" in bad.stderr


def test_a_completed_run_whose_steady_state_was_not_met_is_not_clean():
    probe = {
        "activity": {"name": "correct-ratio"},
        "output": 0.75,
        "tolerance_met": False,
    }
    j = _journal([])
    j["steady_states"] = {"before": {"steady_state_met": False, "probes": [probe]}, "after": None}
    assert steady_state_problems(j) == [
        "before: correct-ratio not met (output 0.75)",
        "no steady-state check after the method",
    ]
    ok = {"steady_state_met": True, "probes": [dict(probe, output=1.0, tolerance_met=True)]}
    j["steady_states"] = {"before": ok, "after": ok}
    assert steady_state_problems(j) == []
