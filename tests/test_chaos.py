"""Chaos experiments: every one validates; the local ones run for real against `twlb up`,
complete with the steady state met before and after, fail fast when pointed at nothing,
and their journals plus a recording become a dataset with the training columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from chaoslib.exceptions import ActivityFailed
from twlb.balancer.features import FEATURE_NAMES
from twlb.chaos.actions import balancer_recovered, kill_balancer
from twlb.chaos.journal import chaos_intervals, steady_state_problems
from twlb.chaos.probes import answer_ratio, verified_load
from twlb.chaos.state import load_cluster
from twlb.ml.dataset import read_dataset, schema
from twlb.processes.managed import (
    ManagedProcess,
    free_port,
    free_port_range,
    pid_alive,
    twlb_argv,
)

from twlb.spec import NodeClass

REPO = Path(__file__).resolve().parents[1]
CHAOS = str(Path(sys.executable).parent / "chaos")
CLUSTER_EXPERIMENTS = sorted((REPO / "chaos").glob("*.json"))
LOCAL_EXPERIMENTS = sorted((REPO / "chaos" / "local").glob("*.json"))
RUN_TIMEOUT_S = 150


def _chaos_argv(log: Path, *args: str) -> list[str]:
    return [CHAOS, "--no-version-check", "--log-file", str(log), *args]


def _run_experiment(
    experiment: Path, journal: Path, env: dict[str, str], timeout: float = RUN_TIMEOUT_S
) -> dict[str, Any]:
    out = subprocess.run(
        _chaos_argv(
            journal.with_suffix(".log"),
            "run",
            "--rollback-strategy",
            "always",
            "--journal-path",
            str(journal),
            str(experiment),
        ),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=journal.parent,
    )
    assert journal.exists(), out.stderr[-3000:]
    return json.loads(journal.read_text())


@pytest.fixture(scope="module", autouse=True)
def validations(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[Path, subprocess.Popen[str]]]:
    """`chaos validate` on every experiment, started when the module starts and at the
    lowest CPU priority, so that its imports (kubernetes, chaostoolkit) use the time the
    experiments spend waiting; the test at the end of the module collects them."""
    logs = tmp_path_factory.mktemp("validate")
    procs = {
        p: subprocess.Popen(
            _chaos_argv(logs / f"{i}.log", "validate", str(p)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: os.nice(19),
        )
        for i, p in enumerate(CLUSTER_EXPERIMENTS + LOCAL_EXPERIMENTS)
    }
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


# ---------------------------------------------------------------- a real embedded cluster


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")


def _start_cluster(workdir: Path, state: Path, tries: int = 3) -> ManagedProcess:
    """`twlb up` on free ports, again on others when another test took one meanwhile."""
    log = workdir / "up.log"
    for _ in range(tries):
        up = ManagedProcess(
            twlb_argv(
                "up", "-f", str(REPO / "chaos" / "local" / "cluster.yaml"),
                "--port-base", str(free_port_range(8)), "--state-dir", str(state),
                "--no-prometheus", "--duration", "300",
            ),
            log_path=log,
        ).start()  # fmt: skip
        deadline = time.monotonic() + 90
        while up.alive() and not (state / "state.json").exists():
            if time.monotonic() > deadline:
                up.stop()
                raise AssertionError("the cluster did not come up within 90 s")
            time.sleep(0.2)
        if up.alive():
            return up
        if "port in use" not in log.read_text():
            break
    raise AssertionError(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def runs(workdir: Path) -> Iterator[dict[str, Any]]:
    """`twlb up` on the sample cluster with a recorder; the local backend-failure and
    byzantine experiments run against it. Everything started is stopped by its pid."""
    state = workdir / "state"
    up = _start_cluster(workdir, state)
    recorder: ManagedProcess | None = None
    try:
        # A short load first, so the first hypothesis does not measure a cold balancer.
        verified_load(state_dir=str(state), requests=100, rate=50.0)
        recorder = ManagedProcess(
            [
                sys.executable, "-m", "twlb.chaos", "record", "--state-dir", str(state),
                "--out", str(workdir / "recording.jsonl"), "--run-id", "test-run",
                "--seed", "11", "--max-duration", "300",
            ],
            log_path=workdir / "record.log",
        ).start()  # fmt: skip
        env = {"TWLB_CHAOS_STATE_DIR": str(state)}
        journals = {
            name: _run_experiment(
                REPO / "chaos" / "local" / f"{name}.json", workdir / f"{name}.journal.json", env
            )
            for name in ("backend_failure", "byzantine_node")
        }
        recorder.stop()
        yield {"journals": journals, "recording": workdir / "recording.jsonl", "state": state}
    finally:
        for proc in (recorder, up):
            if proc is not None:
                proc.stop()
                assert not pid_alive(proc.pid)


def _assert_completed_with_steady_state(journal: dict[str, Any]) -> None:
    assert steady_state_problems(journal) == []
    assert journal["status"] == "completed"
    assert journal["steady_states"]["before"]["steady_state_met"] is True
    assert journal["steady_states"]["after"]["steady_state_met"] is True


def test_killing_a_node_keeps_the_steady_state(runs: dict[str, Any]):
    journal = runs["journals"]["backend_failure"]
    _assert_completed_with_steady_state(journal)
    by_name = {r["activity"]["name"]: r for r in journal["run"]}
    assert by_name["kill-backend-node"]["status"] == "succeeded"
    assert by_name["runtime-restarts-the-node"]["output"]["restored"] is True


def test_a_byzantine_node_is_ejected_and_wrong_answers_stay_rare(runs: dict[str, Any]):
    journal = runs["journals"]["byzantine_node"]
    _assert_completed_with_steady_state(journal)
    after = {
        p["activity"]["name"]: p["output"] for p in journal["steady_states"]["after"]["probes"]
    }
    assert 0.0 < after["every-faulty-node-ejected-within-10s"] <= 10.0
    assert after["wrong-answer-ratio-through-the-balancer"] <= 0.005
    # The node gets its fault back, then the balancer readmits it before the run ends.
    assert [r["status"] for r in journal["rollbacks"]] == ["succeeded", "succeeded"]


def test_real_journals_yield_the_kill_and_fault_intervals(runs: dict[str, Any]):
    [killed] = chaos_intervals(runs["journals"]["backend_failure"])
    assert (killed.node, killed.label) == ("chaos-node-0", NodeClass.CRASH)
    assert 0.0 < killed.end - killed.start < 30.0
    [lying] = chaos_intervals(runs["journals"]["byzantine_node"])
    assert (lying.node, lying.label, lying.fault) == (
        "chaos-node-1",
        NodeClass.BYZANTINE,
        "byzantine",
    )
    # The rollback closes it: the node is itself again before the journal ends.
    rollback, _ = runs["journals"]["byzantine_node"]["rollbacks"]
    restored = datetime.fromisoformat(rollback["start"]).timestamp()
    finished = datetime.fromisoformat(rollback["end"]).timestamp()
    assert restored <= lying.end <= finished


def test_a_recorded_run_becomes_a_dataset_with_the_training_columns(
    runs: dict[str, Any], workdir: Path
):
    out = workdir / "dataset.parquet"
    journals = [workdir / f"{n}.journal.json" for n in ("backend_failure", "byzantine_node")]
    done = subprocess.run(
        [
            sys.executable, "-m", "twlb.chaos", "dataset", "--recording", str(runs["recording"]),
            *(a for j in journals for a in ("--journal", str(j))), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["labels"].get("crash", 0) >= 1, summary
    assert summary["labels"].get("byzantine", 0) >= 1, summary
    assert summary["labels"].get("healthy", 0) >= 1, summary
    assert pq.read_schema(out).remove_metadata() == schema(FEATURE_NAMES)
    ds = read_dataset(out, FEATURE_NAMES)
    assert len(ds) == summary["windows"]
    assert set(ds.run_id) == {"test-run"} and set(ds.seed) == {11}
    assert set(ds.node) <= {"chaos-node-0", "chaos-node-1", "chaos-node-2"}


def _probe_arguments(experiment: str, probe: str) -> dict[str, Any]:
    doc = json.loads((REPO / "chaos" / "local" / experiment).read_text())
    [found] = [p for p in doc["steady-state-hypothesis"]["probes"] if p["name"] == probe]
    return found["provider"]["arguments"]


def test_the_resilient_client_rides_out_a_balancer_kill(runs: dict[str, Any]):
    """The balancer-kill experiment's client, on a shorter load: the balancer is SIGKILLed
    a second in, the runtime starts a new one, and the client's retries span the gap."""
    state = str(runs["state"])
    client = _probe_arguments("balancer_kill.json", "resilient-client-correct-ratio")["client"]
    before = load_cluster(state)
    kill = kill_balancer(state, delay_s=1.0)
    ratio = answer_ratio(state_dir=state, requests=60, rate=15.0, mode="resilient", client=client)
    assert balancer_recovered(state, timeout_s=30.0) is True
    after = load_cluster(state)
    assert after.balancer_pid not in (None, kill["pid"])
    assert after.balancer_restarts == before.balancer_restarts + 1
    assert ratio >= 0.99


def test_load_probes_name_bad_client_settings():
    with pytest.raises(ActivityFailed, match="unknown client settings \\['retries'\\]"):
        answer_ratio(url="http://127.0.0.1:9", mode="resilient", client={"retries": 3})
    with pytest.raises(ActivityFailed, match="invalid client"):
        answer_ratio(url="http://127.0.0.1:9", mode="resilient", client={"deadline_s": -1})


# ---------------------------------------------------------------- pointed at nothing


def test_an_experiment_pointed_at_nothing_fails_fast_with_a_clear_message(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (stopped / "state.json").write_text(
        json.dumps({"cluster": "c", "runtime_pid": gone.pid, "stopped": True, "nodes": []})
    )
    dead_url = f"http://127.0.0.1:{free_port()}"
    at_dead_url = tmp_path / "dead_url.json"
    at_dead_url.write_text(
        json.dumps(
            {
                "title": "correct answers through a balancer that is not there",
                "description": "pointed at a URL nothing listens on",
                "steady-state-hypothesis": {
                    "title": "correct answers",
                    "probes": [
                        {
                            "type": "probe",
                            "name": "correct-ratio",
                            "tolerance": {"type": "range", "range": [0.99, 1.0]},
                            "provider": {
                                "type": "python",
                                "module": "twlb.chaos.probes",
                                "func": "answer_ratio",
                                "arguments": {"url": dead_url, "requests": 50, "rate": 100.0},
                            },
                        }
                    ],
                },
                "method": [],
            }
        )
    )
    local = REPO / "chaos" / "local" / "backend_failure.json"
    cases = {
        "empty": (local, {"TWLB_CHAOS_STATE_DIR": str(empty)}, "state.json does not exist"),
        "stopped": (local, {"TWLB_CHAOS_STATE_DIR": str(stopped)}, "has stopped"),
        "dead_url": (at_dead_url, {}, f"balancer {dead_url} is unreachable"),
    }
    t0 = time.monotonic()
    procs = {
        name: subprocess.Popen(
            _chaos_argv(
                tmp_path / f"{name}.log",
                "run",
                "--journal-path",
                str(tmp_path / f"{name}.journal.json"),
                str(experiment),
            ),
            env={**os.environ, **env},
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for name, (experiment, env, _) in cases.items()
    }
    try:
        for proc in procs.values():
            proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert time.monotonic() - t0 < 90.0
    for name, (_, _, message) in cases.items():
        assert procs[name].returncode != 0, name
        journal = json.loads((tmp_path / f"{name}.journal.json").read_text())
        assert journal["status"] == "failed", name
        assert journal["steady_states"]["before"]["steady_state_met"] is False
        assert journal["run"] == []
        probe = journal["steady_states"]["before"]["probes"][0]
        assert probe["duration"] < 15.0, (name, probe["duration"])
        assert message in "".join(probe["exception"]), (name, probe["exception"])


# ---------------------------------------------------------------- every experiment


def test_every_experiment_validates(validations: dict[Path, subprocess.Popen[str]]):
    assert set(validations) == set(CLUSTER_EXPERIMENTS + LOCAL_EXPERIMENTS)
    assert {p.name for p in CLUSTER_EXPERIMENTS} >= {
        "backend_failure.json",
        "byzantine_node.json",
        "latency_injection.json",
        "balancer_kill.json",
        "operator_kill.json",
    }
    assert {p.name for p in LOCAL_EXPERIMENTS} >= {
        "backend_failure.json",
        "byzantine_node.json",
        "latency_injection.json",
        "node_restart_storm.json",
        "balancer_kill.json",
    }
    for p, proc in validations.items():
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, f"{p}: {output[-2000:]}"
        assert "look valid" in output, f"{p}: {output[-2000:]}"
