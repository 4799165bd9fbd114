"""Replicas at run time on the embedded runtime: add, remove, list, and replace on failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families
from twlb.orchestration import scaling
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.orchestration.scaling import FailureMode, HeartbeatSettings
from twlb.processes.managed import (
    ManagedProcess,
    free_port,
    free_port_range,
    pid_alive,
    twlb_argv,
)

from twlb.spec import TrustCluster

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
        # The balancer's admin listener (its traffic port proxies /admin to the backends).
        r = httpx.get(
            self.state()["balancer"]["admin_url"] + "/admin/backends",
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
        out = _twlb("status", "-o", "json", "--state-dir", str(self.state_dir))
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


# ---- replacement that cannot start, and scaling beside failure detection ------------------

FAST_REPLACE = ("--on-failure", "replace", "--heartbeat-interval", "0.3",
                "--heartbeat-timeout", "0.3", "--failure-threshold", "2")  # fmt: skip


def _basic_load(url: str, out: Path, seconds: float, rate: float = 120.0) -> ManagedProcess:
    """`twlb load --mode basic` (one try, no retry: what the balancer delivers) in the
    background; its JSON report goes to `out`."""
    return ManagedProcess(
        twlb_argv("load", "--url", url, "--mode", "basic", "--rate", str(rate),
                  "--duration", str(seconds), "--timeout", "2", "--out", str(out), "--quiet"),
        log_path=out.with_suffix(".log"),
    ).start()  # fmt: skip


def _failed_tries_to(balancer_url: str, backend: str) -> int:
    """Tries the balancer sent to `backend` that did not succeed (its counters outlive
    the backend's removal)."""
    text = httpx.get(balancer_url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "twlb_balancer_upstream_requests_total"
                and s.labels.get("backend") == backend
                and s.labels.get("outcome") != "success"
            ):
                total += s.value
    return int(total)


def _served_by(balancer_url: str, keys: int = 80) -> set[str]:
    return {
        httpx.get(balancer_url + "/work", params={"key": f"k{i}"}, timeout=5).json()["node"]
        for i in range(keys)
    }


@pytest.mark.parametrize("runtime", [FAST_REPLACE], indirect=True)
def test_replace_mode_with_the_next_port_taken_keeps_serving_under_basic_load(
    runtime, tmp_path: Path
) -> None:
    """The replacement's usual port (port base + 2 + its index) is taken: the runtime
    starts it on a free port instead, and `twlb up` never stops; under load that does not
    retry, no request fails beyond the tries that reached the killed node."""
    next_port = runtime.base + 2 + 2  # sc-node-2's usual port
    holder = socket.socket()
    holder.bind(("127.0.0.1", next_port))
    holder.listen()
    try:
        before = runtime.status()
        victim = before["nodes"][0]
        balancer = before["balancer"]["url"]
        report = tmp_path / "load.json"
        load = _basic_load(balancer, report, seconds=10)
        time.sleep(2.5)
        os.kill(victim["pid"], signal.SIGKILL)  # a pid the runtime under test started

        def replaced():
            st = runtime.status()
            return st if st["replacements"]["count"] >= 1 else None

        st = wait_until(replaced, 30, "a replacement")
        assert load.popen.wait(60) == 0, load.log_path.read_text()[-2000:]
    finally:
        holder.close()
    entry = st["replacements"]["log"][0]
    assert entry["failed"] == victim["name"] and entry["replacement"] == "sc-node-2"
    assert not entry["replacement_url"].endswith(f":{next_port}")
    assert runtime.proc.alive() and st["running"] is True
    assert "replace" in [e["kind"] for e in st["scaling"]["events"]]
    # The replacement serves: healthy, in the balancer, and keys reach it.
    assert httpx.get(entry["replacement_url"] + "/healthz", timeout=5).status_code == 200
    assert entry["replacement_url"] in runtime.balancer_backends()
    assert "sc-node-2" in _served_by(balancer)
    done = json.loads(report.read_text())
    to_victim = _failed_tries_to(balancer, victim["url"])
    print(f"basic load: {done['sent']} sent, {done['failed']} failed; {to_victim} failed tries "
          f"reached the killed node; replaced in {entry['replacement_s']} s")  # fmt: skip
    assert done["sent"] >= 900 and not done["partial"]
    assert done["failed"] <= to_victim, done
    assert done["wrong"] == 0


def test_a_replacement_that_fails_to_start_is_retried_on_another_port_with_back_off(
    tmp_path: Path, monkeypatch
) -> None:
    """The usual port looks free when checked and is taken by the time the replacement
    binds it (another program won the race): the replacement exits, is reported, and is
    started again on another port after a back-off, while the rest serves the load."""
    tc = TrustCluster.model_validate(yaml.safe_load(CLUSTER))
    base = free_port_range(12)
    cluster = EmbeddedCluster(
        tc, port_base=base, state_dir=tmp_path / "state", prometheus=False,
        failure_mode=FailureMode.REPLACE, heartbeat=HeartbeatSettings(0.3, 0.3, 2),
    )  # fmt: skip
    next_port = base + 2 + 2
    holder = socket.socket()
    holder.bind(("127.0.0.1", next_port))
    holder.listen()
    # The check that would have seen it: it misses, as it would in a race.
    monkeypatch.setattr(scaling, "port_in_use", lambda port, host="127.0.0.1": False)
    try:
        with cluster:
            cluster.start_supervisor(0.05)
            victim = cluster.nodes[0]
            report = tmp_path / "load.json"
            load = _basic_load(cluster.balancer_url, report, seconds=10)
            time.sleep(2.5)
            cluster.kill_node(victim.name)
            wait_until(lambda: cluster.replacements, 40, "a replacement")
            assert load.popen.wait(60) == 0, load.log_path.read_text()[-2000:]
            entry = cluster.replacements[0]
            (failed,) = entry["failed_attempts"]
            assert failed["port"] == next_port and "exited" in failed["error"]
            assert "address already in use" in failed["error"].lower()
            assert not entry["replacement_url"].endswith(f":{next_port}")
            assert entry["replacement_s"] >= 0.5  # the first back-off was waited
            kinds = [e["kind"] for e in cluster.replicas.events]
            assert kinds == ["fail", "replace-failed", "replace"]
            # The state file follows within a supervisor round.
            state = wait_until(
                lambda: (
                    (st := json.loads((tmp_path / "state" / "state.json").read_text()))
                    and not st["scaling"]["replacing"]
                    and st
                ),
                5,
                "the state to show the replacement done",
            )
            assert [e["kind"] for e in state["scaling"]["events"]] == kinds
            assert "sc-node-2" in _served_by(cluster.balancer_url)
            done = json.loads(report.read_text())
            to_victim = _failed_tries_to(cluster.balancer_url, victim.url)
            print(f"basic load: {done['sent']} sent, {done['failed']} failed; {to_victim} "
                  f"failed tries reached the killed node; replaced in {entry['replacement_s']} s "
                  f"after a failed start on port {next_port}")  # fmt: skip
            assert done["sent"] >= 900 and not done["partial"]
            assert done["failed"] <= to_victim, done
    finally:
        holder.close()
    assert all(not n.alive for n in cluster.nodes)


@pytest.mark.parametrize("runtime", [FAST_REPLACE], indirect=True)
def test_a_node_killed_during_replicas_add_2_is_replaced_within_the_usual_time(runtime) -> None:
    """Heartbeats do not wait for scaling: a node killed while `replicas add 2` starts its
    processes is detected before the add is done, and replaced about as fast as a node
    killed while nothing else happens (measured first, on the same runtime)."""

    def replacement(count: int) -> dict:
        def done():
            st = runtime.status()
            return st if st["replacements"]["count"] >= count else None

        return wait_until(done, 40, f"replacement #{count}")["replacements"]["log"][count - 1]

    st = runtime.status()
    killed_at = time.time()
    os.kill(st["nodes"][0]["pid"], signal.SIGKILL)
    usual = replacement(1)
    usual_detect, usual_serve = usual["detected_at"] - killed_at, usual["serving_at"] - killed_at

    url = runtime.state()["control"]["url"]
    token = runtime.state()["tokens"]["runtime"]
    result: dict = {}

    def add_two() -> None:
        r = httpx.post(url + "/replicas", json={"count": 2},
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)  # fmt: skip
        result["status"], result["body"], result["done_at"] = r.status_code, r.json(), time.time()

    adder = threading.Thread(target=add_two)
    adder.start()
    victim = runtime.status()["nodes"][0]
    time.sleep(0.1)
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    during = replacement(2)
    adder.join(120)
    assert result["status"] == 201, result
    assert during["failed"] == victim["name"]
    detect, serve = during["detected_at"] - killed_at, during["serving_at"] - killed_at
    # Detection did not wait for the add: it came before the add was done, whenever the
    # add took longer than a detection usually does (on a quiet machine the two processes
    # start sooner, and the bound below is what holds).
    if result["done_at"] - killed_at > usual_detect + 1.0:
        assert during["detected_at"] < result["done_at"], (detect, result["done_at"] - killed_at)
    assert detect <= usual_detect + 1.0, (detect, usual_detect)
    assert serve <= 1.5 * usual_serve + 1.5, (serve, usual_serve)
    names = {n["name"] for n in runtime.status()["nodes"]}
    added = {r["name"] for r in result["body"]["added"]}
    assert len(added) == 2 and added <= names and during["replacement"] in names
    assert len(names) == 4 and victim["name"] not in names


def test_the_replicas_api_listens_on_the_control_port_asked_for(tmp_path: Path) -> None:
    port = free_port()
    rt = Runtime(tmp_path, "--no-prometheus", "--no-dashboard", "--control-port", str(port))
    try:
        assert rt.state()["control"]["url"] == f"http://127.0.0.1:{port}"
        code, ls = rt.replicas("ls")
        assert code == 0 and len(ls["replicas"]) == 2
    finally:
        rt.stop()


def test_a_taken_control_port_is_a_one_line_usage_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _twlb("up", "-f", str(f), "--port-base", str(free_port_range(8)),
                    "--state-dir", str(tmp_path / "s"), "--control-port", str(port),
                    "--no-prometheus", "--duration", "5")  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"control port {port} is in use" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
