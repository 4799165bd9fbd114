"""`twlb status`: a table of the nodes (fault, truth, the balancer's verdict, trust,
health) and the cluster's addresses, within 100 columns; `-o json` for the document."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from twlb.orchestration.runtime import status_renderables
from twlb.processes.managed import twlb_argv

NODES = [
    ("demo-node-0", 8002, {"type": "benign", "probability": 1.0}, "healthy"),
    ("demo-node-1", 8003, {"type": "byzantine", "probability": 0.8}, "byzantine"),
    ("demo-node-2", 8004, {"type": "delay", "probability": 1.0, "delayMs": 2000}, "delay"),
    ("demo-node-3", 8005, {"type": "error", "probability": 0.5}, "error"),
]


def _document(policy: str, running: bool = True) -> dict:
    trust_rows = [
        {"url": "http://127.0.0.1:8002", "weight": 0.991, "state": "trusted", "held": False,
         "health": {"state": "healthy"}, "up": True, "gossip": {"verdict": "alive"},
         "evidence": {"standing": "clear"}},
        {"url": "http://127.0.0.1:8003", "weight": 0.004, "state": "ejected", "held": False,
         "proven": True, "health": {"state": "healthy"}, "up": True,
         "gossip": {"verdict": "alive"}, "evidence": {"standing": "proven"}},
        {"url": "http://127.0.0.1:8004", "weight": 0.15, "state": "probation", "held": False,
         "health": {"state": "unhealthy"}, "up": False, "gossip": {"verdict": "suspect"},
         "evidence": {"standing": "clear"}},
        {"url": "http://127.0.0.1:8005", "weight": 0.2, "state": "trusted", "held": True,
         "health": {"state": "healthy"}, "up": True, "gossip": {"verdict": "alive"},
         "evidence": {"standing": "suspect"}},
    ]  # fmt: skip
    return {
        "cluster": "demo",
        "running": running,
        "balancer": {"url": "http://127.0.0.1:8000", "policy": policy, "alive": True,
                     "restarts": 1},
        "prometheus": {"url": None},
        "dashboard": {"url": "http://127.0.0.1:7999/"},
        "control": {"url": "http://127.0.0.1:41234"},
        "nodes": [
            {"name": name, "url": f"http://127.0.0.1:{port}", "alive": True, "restarts": 0,
             "fault": fault, "truth": truth}
            for name, port, fault, truth in NODES
        ],
        "trust": {"backends": trust_rows},
    }  # fmt: skip


def _render(document: dict, width: int = 100) -> str:
    console = Console(width=width, record=True)
    for part in status_renderables(document):
        console.print(part, soft_wrap=False)
    return console.export_text()


def _rows(text: str) -> dict[str, str]:
    """Each node's row, with the lines its cells wrapped onto."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("node-"):
            rows[line.split()[0]] = line
        elif rows and line.startswith(" "):
            rows[list(rows)[-1]] += "\n" + line
        elif rows:
            break
    return rows


def test_the_table_shows_each_nodes_fault_truth_verdict_trust_and_health() -> None:
    text = _render(_document("trust"))
    assert "TrustCluster demo: running" in text
    rows = _rows(text)
    assert list(rows) == ["node-0", "node-1", "node-2", "node-3"]
    assert all("\n" not in row for row in rows.values())  # nothing wrapped at 100 columns
    assert rows["node-0"].split()[1:] == ["127.0.0.1:8002", "up", "benign", "healthy", "in",
                                          "0.991", "healthy"]  # fmt: skip
    assert "byzantine p=0.8" in rows["node-1"] and "out: proven liar" in rows["node-1"]
    assert "delay 2000ms" in rows["node-2"] and "out: health" in rows["node-2"]
    assert "unhealthy" in rows["node-2"]
    assert "error p=0.5" in rows["node-3"] and "in, held, suspect" in rows["node-3"]
    for line in ("dashboard  http://127.0.0.1:7999/", "replicas   http://127.0.0.1:41234",
                 "balancer   http://127.0.0.1:8000  policy trust, up, 1 restarts"):  # fmt: skip
        assert line in text


def test_under_round_robin_a_backend_trust_ejected_is_still_in_rotation() -> None:
    rows = _rows(_render(_document("round-robin")))
    assert "in, trust ejected" in rows["node-1"]
    assert "out: health" in rows["node-2"]


def test_a_stopped_cluster_shows_what_it_last_wrote() -> None:
    text = _render(_document("trust", running=False))
    assert "TrustCluster demo: stopped" in text
    assert "no live checks" in text
    assert all(" down " in row for row in _rows(text).values())


@pytest.mark.parametrize("width", [100, 80])
def test_the_table_fits_the_terminal_or_wraps_never_cutting(width: int) -> None:
    text = _render(_document("trust"), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width


def test_status_prints_the_table_and_o_json_the_document(tmp_path: Path) -> None:
    """The command itself, on a state file as `twlb up` leaves it when stopped."""
    state = _document("trust", running=False) | {"stopped": True, "runtime_pid": 0}
    state.pop("running")
    state.pop("trust")
    (tmp_path / "state.json").write_text(json.dumps(state | {"tokens": {"control": "x"}}))
    env = {**os.environ, "COLUMNS": "100"}

    def status(*args: str) -> str:
        done = subprocess.run(twlb_argv("status", "--state-dir", str(tmp_path), *args),
                              capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = status()
    assert "TrustCluster demo: stopped" in table and "node-3" in table
    assert max(len(line) for line in table.splitlines()) <= 100
    document = json.loads(status("-o", "json"))
    assert document["running"] is False and "tokens" not in document
    assert [n["name"] for n in document["nodes"]] == [n[0] for n in NODES]
