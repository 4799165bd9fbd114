"""The balancer in front of a faulty fleet on loopback: ejection, audits, quorum, recovery.

One fleet for the module: 1 error, 1 byzantine, 1 delay (longer than the try timeout) and
3 benign `twlb backend` processes, plus balancers with different policies in front.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from test_balancer_api import ServiceGroup, group  # noqa: F401 (the module fixture)

from twlb.work import digest

TRY_TIMEOUT = "0.3"
QUIET = ("--log-level", "warning")


class Fleet:
    def __init__(self, group: ServiceGroup) -> None:  # noqa: F811
        def node(name: str, *fault: str) -> str:
            return group.start(
                "backend", "--node-id", name, "--seed", str(len(name)), "--packet-loss", "0",
                *fault, *QUIET,
            )  # fmt: skip

        self.error = node("error", "--fault-type", "error")
        self.byzantine = node("byzantine", "--fault-type", "byzantine")
        self.delay = node("delay", "--fault-type", "delay", "--delay-ms", "2000")
        self.benign = [node(f"benign-{i}") for i in range(3)]
        self.all = [self.error, self.byzantine, self.delay, *self.benign]
        backends = [arg for b in self.all for arg in ("--backend", b)]
        common = ("--try-timeout", TRY_TIMEOUT, "--health-interval", "0.25", *QUIET)
        self.outlier = group.start(
            "balancer", "--policy", "outlier-ejection", "--audit-fraction", "0", *backends, *common
        )
        # Every GET audited; a long window so /trust keeps every audit of the test.
        self.audited = group.start(
            "balancer", "--policy", "round-robin", "--audit-fraction", "1", "--window", "60",
            "--seed", "7", *backends, *common,
        )  # fmt: skip
        # A backend of its own to kill and restart, behind a balancer with fast health checks.
        self.victim = group.start("backend", "--node-id", "victim", "--packet-loss", "0", *QUIET)
        self.victim_proc = group.procs[-1]
        self.recovering = group.start(
            "balancer", "--backend", self.benign[0], "--backend", self.victim,
            "--health-interval", "0.1", "--health-timeout", "0.2", *QUIET,
        )  # fmt: skip
        group.wait()


@pytest.fixture(scope="module")
def fleet(group: ServiceGroup) -> Fleet:  # noqa: F811
    return Fleet(group)


async def drive(
    url: str, keys: list[str], headers: dict[str, str] | None = None, concurrency: int = 12
) -> list[tuple[str, httpx.Response]]:
    """GET /work for every key, `concurrency` at a time; (key, response) pairs."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:

        async def one(key: str) -> tuple[str, httpx.Response]:
            async with sem:
                return key, await client.get("/work", params={"key": key})

        return await asyncio.gather(*(one(k) for k in keys))


def metric_values(url: str, name: str) -> dict[str, float]:
    """Samples of one metric from /metrics, by their label text."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            out[labels] = float(value)
    return out


async def test_outlier_ejection_ejects_the_error_node(fleet: Fleet) -> None:
    answers = await drive(fleet.outlier, [f"oe-{i}" for i in range(120)])
    # Idempotent GETs that met the error or delay node were retried on another backend.
    ok = [r for _, r in answers if r.status_code == 200]
    assert len(ok) >= 0.95 * len(answers)
    report = httpx.get(fleet.outlier + "/trust", timeout=5).json()
    by_url = {b["url"]: b for b in report["backends"]}
    assert report["policy"] == "outlier-ejection"
    assert by_url[fleet.error]["policy"]["ejected"] is True
    for b in fleet.benign:
        assert by_url[b]["policy"]["ejected"] is False
    text = httpx.get(fleet.outlier + "/metrics", timeout=5).text
    retries = next(ln for ln in text.splitlines() if ln.startswith("twlb_balancer_retries_total "))
    assert float(retries.split()[1]) >= 1


async def test_audits_flag_the_byzantine_node_and_not_the_healthy_ones(fleet: Fleet) -> None:
    await drive(fleet.audited, [f"audit-{i}" for i in range(200)])
    # Audits run after the answer; wait until the count settles.
    deadline = time.monotonic() + 10
    last = None
    while True:
        checks = metric_values(fleet.audited, "twlb_balancer_audit_checks_total")
        if checks == last or time.monotonic() > deadline:
            break
        last = checks
        time.sleep(0.5)
    mismatches = metric_values(fleet.audited, "twlb_balancer_audit_mismatches_total")

    def ratio(backend: str) -> tuple[float, float]:
        label = f'backend="{backend}"'
        n = checks.get(label, 0.0)
        return n, (mismatches.get(label, 0.0) / n if n else float("nan"))

    n, r = ratio(fleet.byzantine)
    assert n >= 20, checks
    assert r >= 0.95, (n, r)
    for b in fleet.benign:
        n, r = ratio(b)
        assert n >= 20, checks
        assert r < 0.01, (b, n, r)
    audits = metric_values(fleet.audited, "twlb_balancer_audits_total")
    assert audits['result="mismatch"'] > 0
    # The feature window carries the same evidence for the trust model.
    report = httpx.get(fleet.audited + "/trust", timeout=5).json()
    by_url = {b["url"]: b for b in report["backends"]}
    assert by_url[fleet.byzantine]["features"]["audit_mismatch_ratio"] >= 0.95
    for b in fleet.benign:
        assert by_url[b]["features"]["audit_mismatch_ratio"] < 0.01


async def test_quorum_reads_never_return_a_wrong_digest(fleet: Fleet) -> None:
    keys = [f"quorum-{i}" for i in range(120)]
    answers = await drive(fleet.audited, keys, headers={"X-TWLB-Quorum": "2"})
    answered = 0
    for key, r in answers:
        if r.status_code == 200:
            answered += 1
            assert r.json()["digest"] == digest(key), (key, r.headers["x-twlb-backend"])
        else:
            assert r.status_code == 502, r.text
            assert "agreed" in r.json()["error"]
    assert answered >= 0.95 * len(keys)


async def test_bad_quorum_header_is_a_400(fleet: Fleet) -> None:
    r = httpx.get(fleet.audited + "/work?key=a", headers={"X-TWLB-Quorum": "many"}, timeout=5)
    assert r.status_code == 400
    assert "X-TWLB-Quorum" in r.json()["error"]
    r = httpx.post(fleet.audited + "/work?key=a", headers={"X-TWLB-Quorum": "2"}, timeout=5)
    assert r.status_code == 400
    assert "idempotent" in r.json()["error"]


def test_a_killed_backend_leaves_rotation_and_returns_when_restarted(
    fleet: Fleet,
    group: ServiceGroup,  # noqa: F811
) -> None:
    victim, balancer = fleet.victim, fleet.recovering

    def up() -> bool:
        report = httpx.get(balancer + "/trust", timeout=5).json()
        return next(b["up"] for b in report["backends"] if b["url"] == victim)

    def nodes(n: int = 10) -> list[str]:
        with httpx.Client(base_url=balancer, timeout=5) as client:
            return [client.get("/work", params={"key": str(i)}).json()["node"] for i in range(n)]

    def wait_for(want: bool) -> None:
        deadline = time.monotonic() + 15
        while up() is not want:
            assert time.monotonic() < deadline, f"victim up={not want} after 15 s"
            time.sleep(0.05)

    assert "victim" in nodes()
    fleet.victim_proc.kill()
    wait_for(False)
    assert set(nodes()) == {"benign-0"}

    port = int(victim.rsplit(":", 1)[1])
    group.start("backend", "--node-id", "victim", "--packet-loss", "0", *QUIET, port=port)
    group.wait()
    wait_for(True)
    assert "victim" in nodes()
