"""`twlb up` with `dataPlane: envoy`: the cluster's traffic address in `twlb status` is
Envoy's listener, TW-LB runs beside it as its control plane (both supervised by pid),
Prometheus is given Envoy's metrics, and a killed control plane is restarted with its
evidence, the proven liar still out of Envoy's endpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
from conftest import twlb_status, wait_until
from twlb.orchestration.prometheus import render_config
from twlb.processes.managed import ManagedProcess, free_port_range, pid_alive, twlb_argv

SAMPLE = Path(__file__).resolve().parent.parent / "k8s" / "samples" / "envoy.yaml"


def _endpoints(admin: str) -> set[int]:
    text = httpx.get(admin + "/clusters", timeout=5).text
    return {
        int(line.split("::")[1].rsplit(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("twlb_backends::") and "::weight::" in line
    }


def test_up_runs_envoy_on_the_traffic_address_steered_by_the_control_plane(tmp_path: Path):
    base = free_port_range(8)
    state_dir = tmp_path / "state"
    runtime = ManagedProcess(
        twlb_argv("up", "-f", str(SAMPLE), "--port-base", str(base), "--no-prometheus",
                  "--no-dashboard", "--state-dir", str(state_dir), "--duration", "150"),
        log_path=tmp_path / "up.log",
    ).start()  # fmt: skip
    pids: list[int] = []
    try:
        runtime.wait_ready(f"http://127.0.0.1:{base}/healthz", timeout=90)
        st = wait_until(lambda: twlb_status(state_dir), 10, "status")
        url = f"http://127.0.0.1:{base}"
        assert st["balancer"]["url"] == url and st["data_plane"] == "envoy"
        plane = st["control_plane"]
        admin = plane["envoy_admin"]
        # The traffic address is Envoy's listener (its admin interface lists it), not TW-LB.
        listeners = httpx.get(admin + "/listeners", timeout=5).text
        assert f"127.0.0.1:{base}" in listeners
        assert "envoy" in Path(f"/proc/{st['balancer']['pid']}/cmdline").read_text()
        liar = st["nodes"][2]
        assert liar["truth"] == "byzantine"
        liar_port = int(liar["url"].rsplit(":", 1)[1])
        # The basic client through Envoy until the liar is proven and out of the endpoints.
        subprocess.run(
            twlb_argv("load", "--mode", "basic", "--url", url, "--rate", "60",
                      "--duration", "8", "--quiet"),
            capture_output=True, timeout=90, check=True,
        )  # fmt: skip

        def proven() -> bool:
            rows = httpx.get(plane["url"] + "/trust", timeout=5).json()["backends"]
            return any(r["url"] == liar["url"] and r["evidence"]["proven"] for r in rows)

        wait_until(proven, 20, "the liar proven")
        wait_until(lambda: liar_port not in _endpoints(admin), 5, "the liar out of Envoy")
        table = subprocess.run(
            twlb_argv("status", "--state-dir", str(state_dir)), capture_output=True, text=True,
            timeout=30, env={**os.environ, "COLUMNS": "100"},
        )  # fmt: skip
        assert "out: proven liar" in table.stdout, table.stdout
        assert f"balancer   {url}  policy trust, up, data plane envoy" in table.stdout
        assert f"control    {plane['url']}  xDS control plane, up" in table.stdout

        # The control plane killed: Envoy keeps routing; the supervisor restarts it and it
        # takes its evidence back, so the liar stays out.
        os.kill(plane["pid"], signal.SIGKILL)
        r = httpx.get(url + "/work", params={"key": "while-away"}, timeout=5)
        assert r.status_code == 200

        def restarted():
            s = twlb_status(state_dir)
            p = s["control_plane"]
            return p if p["restarts"] >= 1 and p["alive"] else None

        wait_until(restarted, 30, "control plane restart")

        def ready() -> bool:
            try:
                return httpx.get(plane["url"] + "/xds", timeout=2).json()["ready"]
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "the restarted control plane to answer Envoy")
        assert proven()
        assert liar_port not in _endpoints(admin)
        final = twlb_status(state_dir)
        pids = [n["pid"] for n in final["nodes"]] + [
            final["balancer"]["pid"],
            final["control_plane"]["pid"],
        ]
        assert all(pid_alive(p) for p in pids)
    finally:
        runtime.popen.send_signal(signal.SIGTERM)
        runtime.popen.wait(30)
        runtime.stop()
    assert runtime.returncode() == 0, (tmp_path / "up.log").read_text()[-2000:]
    for p in pids:
        assert not pid_alive(p), f"pid {p} outlived the runtime"


def test_prometheus_scrapes_envoy_beside_tw_lb() -> None:
    config = render_config(["http://127.0.0.1:8000"], 1.0, envoys=["http://127.0.0.1:9901"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == ["127.0.0.1:9901"]
    assert jobs["twlb-balancer"]["metrics_path"] == "/metrics"
