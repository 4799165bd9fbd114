"""`twlb operator` as a process: kopf's liveness endpoint, reconciling against an API server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from kube_harness import kubeconfig_for, trustcluster
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

pytestmark = pytest.mark.timeout(90)
NS = "ops"


def test_twlb_operator_serves_liveness_and_reconciles(tmp_path):
    api_port, health_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    emulator = ManagedProcess(
        [sys.executable, str(Path(__file__).with_name("kube_harness.py")), "--port", str(api_port)],
        log_path=tmp_path / "emulator.log",
    ).start()
    operator = None
    try:
        emulator.wait_ready(api + "/version", timeout=60)
        with kubeconfig_for(api):
            operator = ManagedProcess(
                twlb_argv(
                    "operator",
                    "--namespace",
                    NS,
                    "--liveness",
                    f"http://127.0.0.1:{health_port}/healthz",
                    "--status-interval",
                    "1",
                    # The emulator cannot list namespaces cluster-wide (docs/DESIGN.md,
                    # "Real parts in tests").
                    "--no-scan",
                ),
                log_path=tmp_path / "operator.log",
            ).start()
            operator.wait_ready(f"http://127.0.0.1:{health_port}/healthz", timeout=60)
            tc = f"/apis/twlb.dev/v1alpha1/namespaces/{NS}/trustclusters"
            httpx.post(api + tc, json=trustcluster("cli", NS, {"backends": 2})).raise_for_status()
            deadline = time.monotonic() + 30
            status: dict = {}
            while time.monotonic() < deadline and status.get("observedGeneration") != 1:
                status = httpx.get(f"{api}{tc}/cli").json().get("status") or {}
                time.sleep(0.2)
            assert status.get("phase") == "Pending", status
            deployments = httpx.get(f"{api}/apis/apps/v1/namespaces/{NS}/deployments").json()
            assert {d["metadata"]["name"] for d in deployments["items"]} == {
                "cli-node-0",
                "cli-node-1",
                "cli-balancer",
            }
    finally:
        for proc in (operator, emulator):
            if proc is not None:
                proc.stop()
                assert not pid_alive(proc.pid)


def test_twlb_operator_rejects_bad_flags():
    done = ManagedProcess(twlb_argv("operator", "--trust-threshold", "2")).start()
    done.popen.wait(60)
    assert done.returncode() == 2
