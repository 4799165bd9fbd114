"""Benchmark: how fast a killed replica is replaced, alone and while `replicas add 2` runs.

One `twlb up` cluster of three benign backends in the `replace` failure mode with the
default heartbeats (every 1 s, 0.5 s timeout, 3 in a row). Each round:

- reference: a node is SIGKILLed while nothing else happens;
- during scaling: `POST /replicas {"count": 2}` (what `twlb replicas add 2` sends) starts,
  and a node is SIGKILLed 0.1 s later;

and the runtime's own replacement log gives, from the kill, when the first heartbeat
failed, when the node was declared failed (detected) and when its replacement was
registered with the balancer (serving), beside how long the add took. Before heartbeats
and scaling stopped sharing a lock, a node killed during an add was detected only after
the add (9.9 s, against 2.2 s alone) and replaced after 17.3 s (6.8 s alone).

Figures are printed and written to reports/bench/replace_during_scale.json.

    .venv/bin/python bench/replace_during_scale.py              # 3 rounds
    .venv/bin/python bench/replace_during_scale.py --rounds 5
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import httpx
from client_support import REPORT_DIR, machine, write_json
from rich.console import Console
from rich.table import Table
from twlb.processes.managed import ManagedProcess, free_port_range, twlb_argv

CLUSTER = """\
apiVersion: twlb.dev/v1alpha1
kind: TrustCluster
metadata:
  name: rs
spec:
  backends: 3
  seed: 5
  policy: consistent-hash
"""


class Runtime:
    """`twlb up` in replace mode, as a user starts it, read through its state file."""

    def __init__(self, workdir: Path) -> None:
        spec = workdir / "cluster.yaml"
        spec.write_text(CLUSTER)
        self.state_dir = workdir / "state"
        self.base = free_port_range(60)
        self.proc = ManagedProcess(
            twlb_argv("up", "-f", str(spec), "--port-base", str(self.base), "--model",
                      "heuristic", "--state-dir", str(self.state_dir), "--no-prometheus",
                      "--no-dashboard", "--on-failure", "replace", "--duration", "1800"),
            log_path=workdir / "up.log",
        ).start()  # fmt: skip
        self.proc.wait_ready(f"http://127.0.0.1:{self.base}/healthz", timeout=120)
        bound = time.monotonic() + 30
        while not (self.state().get("control") or {}).get("url"):
            if time.monotonic() > bound:
                raise RuntimeError("the replicas API did not come up")
            time.sleep(0.1)

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def kill_one(self) -> tuple[str, float]:
        """SIGKILL the first node (a pid this runtime started); (its name, the time)."""
        node = self.state()["nodes"][0]
        killed_at = time.time()
        os.kill(node["pid"], signal.SIGKILL)
        return node["name"], killed_at

    def replacement_of(self, name: str, timeout: float = 120.0) -> dict[str, Any]:
        bound = time.monotonic() + timeout
        while time.monotonic() < bound:
            for entry in self.state().get("replacements", {}).get("log", []):
                if entry["failed"] == name:
                    return entry
            time.sleep(0.05)
        raise RuntimeError(f"{name} was not replaced within {timeout}s")

    def add(self, count: int, result: dict[str, Any]) -> None:
        state = self.state()
        started = time.time()
        r = httpx.post(
            state["control"]["url"] + "/replicas",
            json={"count": count},
            headers={"Authorization": f"Bearer {state['tokens']['runtime']}"},
            timeout=300,
        )
        result.update(status=r.status_code, started=started, done=time.time())

    def remove(self, count: int) -> None:
        state = self.state()
        r = httpx.request(
            "DELETE",
            state["control"]["url"] + "/replicas",
            json={"count": count},
            headers={"Authorization": f"Bearer {state['tokens']['runtime']}"},
            timeout=120,
        )
        r.raise_for_status()

    def stop(self) -> None:
        if self.proc.alive():
            self.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            self.proc.popen.wait(60)  # type: ignore[union-attr]
        self.proc.stop()


def timeline(entry: dict[str, Any], killed_at: float) -> dict[str, float]:
    return {
        "first_failed_heartbeat_s": round(entry["first_failed_heartbeat_at"] - killed_at, 3),
        "detected_s": round(entry["detected_at"] - killed_at, 3),
        "serving_s": round(entry["serving_at"] - killed_at, 3),
    }


def one_round(rt: Runtime) -> dict[str, Any]:
    name, killed_at = rt.kill_one()
    alone = timeline(rt.replacement_of(name), killed_at)
    time.sleep(2.0)  # the fleet settles
    added: dict[str, Any] = {}
    adder = threading.Thread(target=rt.add, args=(2, added))
    adder.start()
    time.sleep(0.1)
    name, killed_at = rt.kill_one()
    during = timeline(rt.replacement_of(name), killed_at)
    adder.join(300)
    if added.get("status") != 201:
        raise RuntimeError(f"replicas add 2 answered {added}")
    during["add_took_s"] = round(added["done"] - added["started"], 3)
    during["add_done_s"] = round(added["done"] - killed_at, 3)
    rt.remove(2)  # back to three for the next round
    time.sleep(2.0)
    return {"alone": alone, "during_add_2": during}


@click.command()
@click.option("--rounds", default=3, type=click.IntRange(1, 20), help="Rounds (two kills each).")
@click.option("--out", default=str(REPORT_DIR / "replace_during_scale.json"),
              type=click.Path(dir_okay=False), help="JSON report.")  # fmt: skip
def main(rounds: int, out: str) -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="twlb-replace-") as tmp:
        rt = Runtime(Path(tmp))
        try:
            runs = []
            for i in range(rounds):
                runs.append(one_round(rt))
                console.print(f"round {i + 1}/{rounds}: {runs[-1]}")
        finally:
            rt.stop()

    def median(case: str, what: str) -> float:
        return round(statistics.median(r[case][what] for r in runs), 3)

    whats = ("first_failed_heartbeat_s", "detected_s", "serving_s")
    summary = {case: {w: median(case, w) for w in whats} for case in ("alone", "during_add_2")}
    summary["during_add_2"]["add_took_s"] = median("during_add_2", "add_took_s")
    summary["during_add_2"]["detected_before_add_done"] = all(
        r["during_add_2"]["detected_s"] < r["during_add_2"]["add_done_s"] for r in runs
    )
    report = {
        "command": f".venv/bin/python bench/replace_during_scale.py --rounds {rounds}",
        "heartbeat": {"interval_s": 1.0, "timeout_s": 0.5, "failure_threshold": 3},
        "machine": machine(),
        "rounds": runs,
        "median": summary,
    }
    table = Table(title="A killed replica, from the kill (median of rounds, seconds)")
    for col in ("case", "first failed heartbeat", "detected", "serving", "add 2 took"):
        table.add_column(col)
    for case in ("alone", "during_add_2"):
        m = summary[case]
        table.add_row(
            case, str(m["first_failed_heartbeat_s"]), str(m["detected_s"]),
            str(m["serving_s"]), str(m.get("add_took_s", "")),
        )  # fmt: skip
    console.print(table)
    console.print(f"written {write_json(Path(out), report)}")


if __name__ == "__main__":
    main()
