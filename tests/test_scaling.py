"""Replicas at run time on the embedded runtime: add, remove, list, and replace on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from twlb.processes.managed import ManagedProcess, free_port_range, pid_alive, twlb_argv

CLUSTER = """\
apiVersion: twlb.dev/v1alpha1
kind: TrustCluster
metadata:
  name: sc
spec:
  backends: 2
  seed: 3
  policy: consistent-hash
"""

pytestmark = pytest.mark.timeout(240)  # two runtimes; generous for a loaded machine


def _twlb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(twlb_argv(*args), capture_output=True, text=True, timeout=90)


class Runtime:
    def __init__(self, tmp: Path, *extra: str) -> None:
        f = tmp / "c.yaml"
        f.write_text(CLUSTER)
        self.base = free_port_range(12)
        self.state_dir = tmp / "state"
        self.proc = ManagedProcess(
            twlb_argv("up", "-f", str(f), "--port-base", str(self.base),
                      "--model", "heuristic", "--state-dir", str(self.state_dir),
                      "--duration", "220", *(extra or ("--no-prometheus",))),
            log_path=tmp / "up.log",
        ).start()  # fmt: skip
        self.proc.wait_ready(f"http://127.0.0.1:{self.base}/healthz", timeout=60)
        wait_until(lambda: self.state().get("control", {}).get("url"), 20, "the control server")

    def state(self) -> dict:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def balancer_backends(self) -> list[str]:
        token = self.state()["tokens"]["admin"]
        r = httpx.get(
            f"http://127.0.0.1:{self.base}/admin/backends",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        r.raise_for_status()
        return sorted(r.json()["backends"])

    def replicas(self, *args: str) -> tuple[int, dict | str]:
        out = _twlb("replicas", *args, "--state-dir", str(self.state_dir))
        if out.returncode == 0:
            return 0, json.loads(out.stdout)
        return out.returncode, out.stderr

    def status(self) -> dict:
        out = _twlb("status", "--state-dir", str(self.state_dir))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def stop(self) -> None:
        if self.proc.alive():
            self.proc.popen.send_signal(signal.SIGTERM)
            self.proc.popen.wait(30)
        self.proc.stop()


@pytest.fixture
def runtime(tmp_path: Path, request) -> Iterator[Runtime]:
    rt = Runtime(tmp_path, *getattr(request, "param", ()))
    try:
        yield rt
    finally:
        rt.stop()


def _scraped(runtime: Runtime) -> set[str]:
    url = runtime.state()["prometheus"]["url"]
    r = httpx.get(url + "/api/v1/targets", params={"state": "active"}, timeout=5)
    return {t["scrapeUrl"].rsplit("/", 1)[0] for t in r.json()["data"]["activeTargets"]}


@pytest.mark.parametrize("runtime", [("--prometheus",)], indirect=True)
def test_replicas_are_added_and_removed_at_run_time_and_the_balancer_follows(runtime) -> None:
    code, ls = runtime.replicas("ls")
    assert code == 0 and [r["name"] for r in ls["replicas"]] == ["sc-node-0", "sc-node-1"]
    first = {r["name"]: r["pid"] for r in ls["replicas"]}

    code, added = runtime.replicas("add", "2")
    assert code == 0, added
    fresh = added["added"]
    assert [r["name"] for r in fresh] == ["sc-node-2", "sc-node-3"]  # fresh ids
    assert all(pid_alive(r["pid"]) and r["pid"] not in first.values() for r in fresh)
    assert len({r["pid"] for r in added["replicas"]}) == 4
    assert runtime.balancer_backends() == sorted(r["url"] for r in added["replicas"])
    # Prometheus scrapes the new replicas too (its configuration is reloaded).
    wait_until(lambda: {r["url"] for r in fresh} <= _scraped(runtime), 15, "new scrape targets")
    # The balancer routes keys to the new replicas.
    served = {
        httpx.get(
            f"http://127.0.0.1:{runtime.base}/work", params={"key": f"k{i}"}, timeout=5
        ).json()["node"]
        for i in range(60)
    }
    assert {"sc-node-2", "sc-node-3"} & served

    code, removed = runtime.replicas("rm", "3")
    assert code == 0, removed
    gone = removed["removed"]
    assert sorted(r["name"] for r in gone) == ["sc-node-1", "sc-node-2", "sc-node-3"]
    wait_until(lambda: not any(pid_alive(r["pid"]) for r in gone), 10, "removed pids to exit")
    assert [r["name"] for r in removed["replicas"]] == ["sc-node-0"]
    assert pid_alive(first["sc-node-0"])
    assert runtime.balancer_backends() == [removed["replicas"][0]["url"]]
    assert [n["name"] for n in runtime.status()["nodes"]] == ["sc-node-0"]
    wait_until(lambda: not {r["url"] for r in gone} & _scraped(runtime), 15, "targets dropped")

    # Bad requests: the last replica stays; counts out of range are usage errors.
    code, err = runtime.replicas("rm", "1")
    assert code == 2 and "at least one must remain" in err
    code, err = runtime.replicas("add", "0")
    assert code == 2 and "0" in err
    url = runtime.state()["control"]["url"]
    assert httpx.get(url + "/replicas", timeout=5).status_code == 401
    bad = httpx.post(url + "/replicas", json={"count": "many"},
                     headers={"Authorization": "Bearer " + runtime.state()["tokens"]["runtime"]},
                     timeout=5)  # fmt: skip
    assert bad.status_code == 422 and "count" in bad.json()["error"]
    assert (
        httpx.get(url + "/replicas", headers={"Authorization": "Bearer x"}, timeout=5).status_code
        == 401
    )


@pytest.mark.parametrize(
    "runtime",
    [("--on-failure", "replace", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.2",
      "--failure-threshold", "2")],
    indirect=True,
)  # fmt: skip
def test_replace_mode_replaces_a_killed_replica_with_a_fresh_one(runtime) -> None:
    before = runtime.status()
    assert before["failure_mode"] == "replace" and before["replacements"]["count"] == 0
    victim = before["nodes"][0]
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)  # a pid the runtime under test started

    def replaced():
        st = runtime.status()
        return st if st["replacements"]["count"] >= 1 else None

    st = wait_until(replaced, 30, "a replacement")
    entry = st["replacements"]["log"][0]
    assert entry["failed"] == victim["name"] and entry["replacement"] == "sc-node-2"
    assert entry["failed_heartbeats"] == 2
    assert killed_at <= entry["first_failed_heartbeat_at"] <= entry["detected_at"]
    assert entry["detected_at"] <= entry["serving_at"]
    names = [n["name"] for n in st["nodes"]]
    assert victim["name"] not in names and "sc-node-2" in names
    assert all(n["alive"] for n in st["nodes"])
    assert victim["url"] not in runtime.balancer_backends()
    assert entry["replacement_url"] in runtime.balancer_backends()
    r = httpx.get(entry["replacement_url"] + "/healthz", timeout=5)
    assert r.status_code == 200
    log = (runtime.state_dir / "logs").parent.parent / "up.log"
    assert f"{victim['name']} failed 2 heartbeats: replaced by sc-node-2" in log.read_text()
