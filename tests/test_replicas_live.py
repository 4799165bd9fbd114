"""Balancer replicas on one machine, as `twlb up` runs them: three `twlb balancer`
processes accepting from one socket, sharing audit evidence through their admin
listeners, in front of real `twlb backend` nodes; load from `twlb load --mode basic` (one
try, no retries: a client that cannot repair a wrong answer).

- Liars (one lying on every answer, one on 30%) deliver no more wrong answers in total
  than one balancer's bound allows, and once any replica's audit caught a liar's lie the
  others catch its next one: every replica has it out within 1 s of the first.
- A replica sending false evidence (claims that honest backends are proven liars, with
  requests said to expose them) gets no honest backend ejected anywhere.
- No token on any command line; the traffic port proxies /admin, /trust and /metrics to
  the backends; the access log is JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from twlb.balancer.evidence import EvidenceRule
from twlb.processes.managed import ManagedProcess, free_port_range, pid_alive, twlb_argv

AUDIT = 0.05
#: Answers a liar may still give while the audit that proves it is in flight, and while
#: the proof travels to the other replicas (the load's requests in flight, and a margin).
IN_FLIGHT = 4

CLUSTER = """\
apiVersion: twlb.dev/v1alpha1
kind: TrustCluster
metadata: {{name: {name}}}
spec:
  backends: {backends}
  seed: 1
  policy: {policy}
  nodes:
{nodes}
  balancer: {{replicas: 3, auditFraction: {audit}, drainS: {drain}}}
  gossip: {{enabled: false}}
"""


@dataclass
class Up:
    """A `twlb up` run: its process, state directory and addresses."""

    proc: ManagedProcess
    state_dir: Path
    url: str
    tmp: Path

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    @property
    def admins(self) -> list[str]:
        return [r["admin_url"] for r in self.state()["balancer"]["replicas"]]

    def node_url(self, index: int) -> str:
        return self.state()["nodes"][index]["url"]

    def token(self, which: str) -> str:
        return self.state()["tokens"][which]

    def trust(self, admin: str) -> dict[str, dict]:
        rows = httpx.get(admin + "/trust", timeout=5).json()["backends"]
        return {r["url"]: r for r in rows}

    def load(self, name: str, rate: float, duration: float, **env: str) -> ManagedProcess:
        out = self.tmp / f"{name}.json"
        return ManagedProcess(
            twlb_argv(
                "load", "--url", self.url, "--mode", "basic", "--rate", str(rate),
                "--duration", str(duration), "--rounds", "2", "--key-prefix", f"{name}-",
                "--out", str(out), "--quiet",
            ),
            env=env or None,
            log_path=self.tmp / f"{name}.log",
        ).start()  # fmt: skip

    def report(self, name: str) -> dict:
        return json.loads((self.tmp / f"{name}.json").read_text())

    def access_lines(self) -> list[dict]:
        """Every replica's access log lines (JSON), each parsed."""
        lines = []
        for log in sorted((self.state_dir / "logs").glob("balancer*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if '"twlb.access"' in line:
                    lines.append(json.loads(line))
        return lines


def start_up(tmp: Path, name: str, nodes: str, backends: int, policy: str, **env: str) -> Up:
    spec = tmp / f"{name}.yaml"
    spec.write_text(
        CLUSTER.format(
            name=name, backends=backends, policy=policy, nodes=nodes, audit=AUDIT, drain=5
        )
    )
    base = free_port_range(backends + 3)
    state_dir = tmp / f"{name}-state"
    proc = ManagedProcess(
        twlb_argv(
            "--log-format", "json", "up", "-f", str(spec), "--port-base", str(base),
            "--no-prometheus", "--no-dashboard", "--model", "heuristic",
            "--state-dir", str(state_dir), "--duration", "600",
        ),
        env=env or None,
        log_path=tmp / f"{name}-up.log",
    ).start()  # fmt: skip
    up = Up(proc, state_dir, f"http://127.0.0.1:{base}", tmp)

    def ready() -> bool:
        if not proc.alive():
            pytest.fail("twlb up exited:\n" + (tmp / f"{name}-up.log").read_text()[-3000:])
        try:
            admins = up.admins
            return len(admins) == 3 and all(
                httpx.get(a + "/readyz", timeout=2).status_code == 200 for a in admins
            )
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            return False

    wait_until(ready, 120, "three balancer replicas ready")
    return up


def stop_up(up: Up) -> None:
    pids = [r["pid"] for r in up.state()["balancer"]["replicas"]]
    pids += [n["pid"] for n in up.state()["nodes"]]
    up.proc.stop(timeout=30)
    for pid in pids:
        assert not pid_alive(pid), f"pid {pid} outlived twlb up"


LIARS = """\
    - {index: 0, fault: {type: byzantine, probability: 1.0}}
    - {index: 1, fault: {type: byzantine, probability: 0.3}}"""


@pytest.fixture(scope="module")
def liars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # New backends are audited at the audit fraction too, not at probation's 0.5: the
    # liars must be caught at fraction a, where three replicas each catching a liar alone
    # would deliver about three times one balancer's ~1/a + 1 wrong answers (at 0.5 each
    # replica would catch it within a couple of answers, sharing or not).
    up = start_up(
        tmp_path_factory.mktemp("liars"), "reps", LIARS, 6, "trust",
        TWLB_BALANCER_PROBATION_AUDIT_FRACTION=str(AUDIT),
        # The load's few keep-alive connections would stay with whichever replicas
        # accepted them: a connection closes after 20 answers, so the load's requests
        # spread over all three replicas (the default cap, 1000, does so more slowly).
        TWLB_BALANCER_KEEPALIVE_REQUESTS="20",
    )  # fmt: skip
    try:
        yield up
    finally:
        stop_up(up)


def _watch_ejections(up: Up, backends: list[str], stop: threading.Event) -> dict:
    """When each replica's /trust first shows each backend ejected (time.monotonic())."""
    seen: dict[tuple[str, str], float] = {}
    admins = up.admins
    while not stop.is_set():
        for admin in admins:
            try:
                rows = up.trust(admin)
            except (httpx.HTTPError, ValueError):
                continue
            now = time.monotonic()
            for b in backends:
                if rows[b]["state"] == "ejected" and rows[b]["evidence"]["proven"]:
                    seen.setdefault((admin, b), now)
        time.sleep(0.02)
    return seen


def test_three_replicas_deliver_a_liars_wrong_answers_once_not_three_times(liars: Up) -> None:
    up = liars
    liar_full, liar_part = up.node_url(0), up.node_url(1)
    stop = threading.Event()
    seen: dict = {}
    watcher = threading.Thread(
        target=lambda: seen.update(_watch_ejections(up, [liar_full, liar_part], stop))
    )
    watcher.start()
    load = up.load("liars", rate=100, duration=30)
    try:
        load.popen.wait(90)  # type: ignore[union-attr]
    finally:
        stop.set()
        watcher.join(30)
    report = up.report("liars")
    assert report["failed"] == 0, report
    names = {n["url"]: n["name"] for n in up.state()["nodes"]}
    rule = EvidenceRule()
    bound = rule.wrong_answers_bound(AUDIT, 1.0)  # one balancer's, 99.9%
    expected = rule.wrong_answers_expected(AUDIT, 1.0)  # one balancer's mean, ~1/a + 1
    admins = up.admins
    for liar in (liar_full, liar_part):
        wrong = report["wrong_by_node"].get(names[liar], 0)
        # Within one balancer's bound (three balancers each catching it alone would
        # deliver about three times one balancer's share).
        assert wrong <= bound + IN_FLIGHT, (names[liar], wrong, bound)
        times = [seen.get((a, liar)) for a in admins]
        assert all(t is not None for t in times), (names[liar], times)
        polled = max(times) - min(times)  # type: ignore[type-var,operator]
        # When each replica's own evidence proved it (its /trust's `proven_at`, on the
        # machine's monotonic clock, which every process on it shares): the moment it
        # left that replica's rotation.
        proven = [up.trust(a)[liar]["evidence"]["proven_at"] for a in admins]
        spread = max(proven) - min(proven)
        print(f"{names[liar]}: {wrong} wrong answers (one balancer: mean {expected:.0f}, "
              f"99.9% bound {bound}), out of every replica's "
              f"rotation {spread * 1000:.0f} ms after the first's (seen by polling within "
              f"{polled * 1000:.0f} ms)")  # fmt: skip
        assert spread <= 1.0 and polled <= 1.0, (names[liar], spread, polled)
    # Honest nodes: never out-voted, never ejected, anywhere.
    for admin in admins:
        rows = up.trust(admin)
        for url, row in rows.items():
            if url not in (liar_full, liar_part):
                assert row["evidence"]["mismatches"] == 0 and not row["evidence"]["proven"]

    # The mechanism: once any replica's audit caught the liar on every answer in a lie
    # (its own answer audited, or its vote in the audit of another backend's answer: the
    # access line names it among the `odd`), few of its answers follow, wherever they are
    # served (the suspicion travels at once): each replica catching it alone would serve
    # it about 1/a more times.
    lines = up.access_lines()
    caught = min(
        datetime.fromisoformat(x["time"])
        for x in lines
        if x["audit"] == "mismatch" and liar_full in (x.get("odd") or ())
    )
    served = [x for x in lines if x["backend"] == liar_full and x["status"] == 200]
    after = [x for x in served if datetime.fromisoformat(x["request_time"]) > caught]
    print(f"{names[liar_full]}: {len(served) - len(after)} answers served before the first "
          f"verdict against it, {len(after)} after")  # fmt: skip
    assert len(after) <= 2 + IN_FLIGHT, after
    # One address, three processes: each served a share of the load.
    assert {x["replica"] for x in up.access_lines()} == {"balancer-0", "balancer-1", "balancer-2"}


def test_access_log_lines_are_json_with_the_request_fields(liars: Up) -> None:
    lines = liars.access_lines()
    assert lines
    for line in lines[:50]:
        assert {
            "time", "request_time", "request_id", "method", "path", "status", "backend",
            "tries", "audit", "duration_ms", "replica",
        } <= set(line)  # fmt: skip
        assert line["logger"] == "twlb.access" and line["method"] == "GET"
    assert {x["audit"] for x in lines} >= {None, "agreed"}


def test_a_replica_lying_about_evidence_gets_no_honest_backend_ejected(liars: Up) -> None:
    up = liars
    honest = [up.node_url(i) for i in (2, 3, 4, 5)]
    token = up.token("admin")
    forged = {
        "format": 1,
        "replica": "mallory",
        "backends": {
            url: {
                "standing": "proven",
                "offences": 5,
                "backoff_left_s": 3600,
                "exposures": [
                    {"method": "GET", "target": f"/work?key=forged-{i}&rounds=2", "headers": []}
                    for i in range(4)
                ],
            }
            for url in honest
        },
    }
    load = up.load("forged", rate=60, duration=8)
    deadline = time.monotonic() + 8
    answers = []
    with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {token}"}) as client:
        while time.monotonic() < deadline:
            for admin in up.admins:
                r = client.post(admin + "/admin/evidence/exchange", json=forged)
                answers.append(r.status_code)
            time.sleep(0.25)
        evidence = client.get(up.admins[0] + "/admin/evidence").json()
    load.popen.wait(60)  # type: ignore[union-attr]
    assert set(answers) == {200}
    # The claim was heard and looked into: the "exposing" requests were replayed, and the
    # honest answers settled them. (What a peer's claims can have watched is capped: the
    # real liars' claims, made by two replicas each, came first.)
    assert "mallory" in evidence["peers"]
    assert evidence["replays"] >= len(honest), evidence
    assert len(evidence["watched"]) <= 2
    for admin in up.admins:
        rows = up.trust(admin)
        for url in honest:
            ev = rows[url]["evidence"]
            assert not ev["proven"] and ev["mismatches"] == 0, (admin, url, ev)
            assert rows[url]["state"] != "ejected", (admin, url, rows[url])
        metrics = httpx.get(admin + "/metrics", timeout=5).text
        for url in honest:
            line = f'twlb_balancer_ejections_total{{backend="{url}",reason="proven_liar"}} 0\n'
            assert line in metrics, (admin, url)
    assert up.report("forged")["failed"] == 0


def test_no_token_is_on_any_command_line(liars: Up) -> None:
    tokens = [liars.token("admin"), liars.token("control"), liars.token("runtime")]
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True)
    assert not [t for t in tokens if t in ps.stdout]
    # The processes read theirs from files the runtime keeps, readable by its user only.
    assert "--admin-token-file" in ps.stdout and "--control-token-file" in ps.stdout
    for name in ("admin-token", "control-token"):
        path = liars.state_dir / "secrets" / name
        assert path.read_text().strip() in tokens
        assert os.stat(path).st_mode & 0o077 == 0


def test_the_traffic_port_proxies_every_path_the_admin_listener_serves(liars: Up) -> None:
    url = liars.url
    # /admin/backends is the backend's path here: its 404, not the admin API's 401.
    r = httpx.get(url + "/admin/backends", timeout=5)
    assert r.status_code == 404 and "x-request-id" in r.headers
    assert httpx.get(url + "/admin/x", timeout=5).status_code == 404
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert "twlb_node_" in metrics and "twlb_balancer_" not in metrics
    assert httpx.get(url + "/trust", timeout=5).status_code == 404  # the node has none
    assert httpx.get(url + "/readyz", timeout=5).json()["node"]  # the node's readiness
    # Each went to a backend: the balancer's access log names the one that answered.
    time.sleep(0.5)
    proxied = {x["path"]: x["backend"] for x in liars.access_lines()}
    for path in ("/admin/backends", "/admin/x", "/metrics", "/trust", "/readyz"):
        assert proxied.get(path, "").startswith("http://127.0.0.1:"), (path, proxied.get(path))
    admin = liars.admins[0]
    assert "twlb_balancer_request_duration_seconds_bucket" in httpx.get(admin + "/metrics").text
    assert "process_resident_memory_bytes" in httpx.get(admin + "/metrics").text
    assert httpx.get(admin + "/admin/backends", timeout=5).status_code == 401
    assert httpx.get(admin + "/work", timeout=5).status_code == 404
