"""The embedded runtime: `twlb up` runs a TrustCluster as processes and stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import twlb_status, wait_until
from twlb.orchestration.supervision import (
    RESTART_BASE_S,
    RESTART_CAP_S,
    RESTART_RESET_S,
    RestartBackoff,
)
from twlb.processes.managed import (
    ManagedProcess,
    free_port_range,
    pid_alive,
    twlb_argv,
)

CLUSTER = """\
apiVersion: twlb.dev/v1alpha1
kind: TrustCluster
metadata:
  name: rt
spec:
  backends: 3
  seed: 4
  policy: round-robin
  nodes:
    - index: 2
      fault: {type: crash, probability: 1.0}
"""


def test_invalid_file_stops_with_the_field_named_and_status_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER.replace("backends: 3", "backends: 0"))
    out = subprocess.run(
        twlb_argv("up", "-f", str(bad), "--state-dir", str(tmp_path / "s")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "spec.backends" in out.stderr
    missing = subprocess.run(
        twlb_argv("up", "-f", str(tmp_path / "nope.yaml")), capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    # Latin-1 bytes where UTF-8 text belongs: status 2 naming the byte, no traceback.
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(CLUSTER.replace("backends: 3", "backends: 3 # caf\xe9").encode("latin-1"))
    out = subprocess.run(
        twlb_argv("up", "-f", str(latin), "--state-dir", str(tmp_path / "s")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "latin.yaml: not UTF-8 text (byte " in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER)
    base = free_port_range(8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 3))  # node 1's port
        s.listen()
        out = subprocess.run(
            twlb_argv("up", "-f", str(f), "--port-base", str(base), "--no-prometheus",
                      "--state-dir", str(tmp_path / "s")),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 2
    assert f"port {base + 3}" in out.stderr and "in use" in out.stderr


def test_up_serves_restarts_crashed_node_and_leaves_no_process(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER)
    base = free_port_range(8)
    state_dir = tmp_path / "state"
    runtime = ManagedProcess(
        twlb_argv("up", "-f", str(f), "--port-base", str(base), "--no-prometheus",
                  "--state-dir", str(state_dir), "--duration", "120"),
        log_path=tmp_path / "up.log",
    ).start()  # fmt: skip
    try:
        runtime.wait_ready(f"http://127.0.0.1:{base}/healthz", timeout=60)
        st = wait_until(lambda: twlb_status(state_dir), 10, "status")
        assert st["running"] is True
        assert [n["truth"] for n in st["nodes"]] == ["healthy", "healthy", "crash"]
        crash = st["nodes"][2]
        assert crash["fault"]["type"] == "crash"
        pids = {n["name"]: n["pid"] for n in st["nodes"]}

        # Without -o json: the table, read live from the nodes and the balancer's /trust.
        table = subprocess.run(
            twlb_argv("status", "--state-dir", str(state_dir)), capture_output=True, text=True,
            timeout=30, env={**os.environ, "COLUMNS": "100"},
        )  # fmt: skip
        assert table.returncode == 0, table.stderr
        assert "TrustCluster rt: running" in table.stdout
        rows = [line.split() for line in table.stdout.splitlines() if line.startswith("node-")]
        assert [(r[0], r[2], r[3]) for r in rows] == [
            ("node-0", "up", "benign"), ("node-1", "up", "benign"), ("node-2", "up", "crash"),
        ]  # fmt: skip
        assert f"balancer   http://127.0.0.1:{base}  policy round-robin, up" in table.stdout
        assert max(len(line) for line in table.stdout.splitlines()) <= 100

        # The balancer answers work through the nodes.
        r = httpx.get(f"http://127.0.0.1:{base}/work", params={"key": "k"}, timeout=5)
        assert r.status_code in (200, 502, 503)

        # The crash node exits on its first request; the runtime restarts it with back-off.
        with pytest.raises(httpx.HTTPError):
            httpx.get(crash["url"] + "/work", params={"key": "x"}, timeout=5)
        wait_until(lambda: not pid_alive(pids[crash["name"]]), 5, "crash node to exit")

        def restarted():
            s = twlb_status(state_dir)
            n = s["nodes"][2]
            return (
                n if n["restarts"] >= 1 and n["alive"] and n["pid"] != pids[crash["name"]] else None
            )

        node = wait_until(restarted, 20, "crash node restart")

        def ready():
            try:
                return httpx.get(node["url"] + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 10, "restarted node to answer")

        # A killed balancer is restarted on its port, as a kubelet would restart its pod.
        os.kill(st["balancer"]["pid"], signal.SIGKILL)

        def balancer_back():
            s = twlb_status(state_dir)
            b = s["balancer"]
            return b if b["restarts"] >= 1 and b["alive"] else None

        wait_until(balancer_back, 20, "balancer restart")
        runtime.wait_ready(f"http://127.0.0.1:{base}/healthz", timeout=30)

        final = twlb_status(state_dir)
        all_pids = [n["pid"] for n in final["nodes"]] + [final["balancer"]["pid"]]
        assert all(pid_alive(p) for p in all_pids)
    finally:
        runtime.popen.send_signal(signal.SIGTERM)
        runtime.popen.wait(30)
        runtime.stop()
    assert runtime.returncode() == 0, (tmp_path / "up.log").read_text()[-2000:]
    for p in all_pids:
        assert not pid_alive(p), f"pid {p} outlived the runtime"
    assert json.loads((state_dir / "state.json").read_text())["stopped"] is True


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_clean_run() -> None:
    r = RestartBackoff()
    r.started(0.0)
    now, waits = 1.0, []
    for _ in range(6):  # dies at once after every start
        assert r.observe(False, now) == "exited"
        waits.append(round(r.next_start - now, 3))
        assert r.observe(False, r.next_start - 0.01) is None  # not yet
        now = r.next_start
        assert r.observe(False, now) == "due"
        r.started(now)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0] and RESTART_CAP_S == 8.0
    assert r.restarts == 6
    assert r.observe(True, now + RESTART_RESET_S + 0.1) is None
    assert r.backoff_s == RESTART_BASE_S  # ran cleanly long enough
