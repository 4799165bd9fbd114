"""The live dashboard in a real headless browser (Debian's chromium through Playwright).

A six-node cluster runs under `twlb up` on loopback with its dashboard; the page must
load with no console error, show every node and the gossip view, and turn a node
switched to byzantine through its control endpoint to "ejected" within PAGE_SLACK_S of
the balancer itself ejecting it. The screenshot is kept in reports/test-artifacts/.

Chromium missing is a failure, not a skip: `.ci/run` installs `chromium`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import twlb_status, wait_until
from playwright.sync_api import sync_playwright
from twlb.dashboard.screenshot import CHROMIUM, launch
from twlb.processes.managed import ManagedProcess, free_port_range, pid_alive, twlb_argv

ARTIFACTS = Path(__file__).resolve().parent.parent / "reports" / "test-artifacts"

#: Six healthy nodes, so that the one switched to byzantine is the only one to eject.
CLUSTER = """\
apiVersion: twlb.dev/v1alpha1
kind: TrustCluster
metadata:
  name: dash
spec:
  backends: 6
  seed: 3
  policy: trust
  balancer:
    auditFraction: 0.3
    windowS: 5
    healthIntervalS: 1
"""
#: The dashboard polls once a second; the page may lag the balancer by one round plus
#: the push and a render, so it gets two rounds of slack after the balancer's own time.
PAGE_SLACK_S = 2.5
#: Bound on the whole wait for an ejection (the balancer needs a few audit windows).
EJECT_TIMEOUT_S = 45.0


class Load:
    """Requests through the balancer on a thread: bounded in count and time."""

    def __init__(self, url: str, rate: float = 40.0, limit: int = 4000, max_s: float = 90.0):
        self.url, self.rate, self.limit, self.max_s = url, rate, limit, max_s
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set() and self.sent < self.limit:
                if time.monotonic() > deadline:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    client.get(self.url + "/work", params={"key": f"k{self.sent}"})
                self.sent += 1
                self.stop.wait(1.0 / self.rate)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10.0)


@pytest.fixture
def cluster(tmp_path: Path):
    """`twlb up` with six nodes and its dashboard; yields (status, state_dir)."""
    spec = tmp_path / "dash.yaml"
    spec.write_text(CLUSTER)
    state_dir = tmp_path / "state"
    base = free_port_range(9)  # dashboard, balancer, Prometheus's slot, six nodes
    proc = ManagedProcess(
        twlb_argv(
            "up", "-f", str(spec), "--port-base", str(base + 1), "--state-dir", str(state_dir),
            "--no-prometheus",
        ),
        log_path=tmp_path / "up.log",
    ).start()  # fmt: skip
    try:
        status = wait_until(
            lambda: (
                (state_dir / "state.json").exists()
                and (s := twlb_status(state_dir)).get("dashboard", {}).get("url")
                and s
            ),
            60.0,
            "twlb up to start the cluster and its dashboard",
        )
        printed = (tmp_path / "up.log").read_text()
        assert f"dashboard: {status['dashboard']['url']}" in printed  # `twlb up` says where
        yield status, state_dir
    finally:
        proc.stop()
        status = json.loads((state_dir / "state.json").read_text())
        pids = [n["pid"] for n in status["nodes"]] + [status["balancer"]["pid"], proc.pid]
        for pid in pids:
            assert not pid or not pid_alive(pid), f"process {pid} outlived the test"


def _gossip_is_shown(page, status: dict) -> None:
    """The gossip panel shows what the nodes answer: "gossip off" when their /gossip is a
    404, else a row per observing node with every member alive in a cluster at rest."""
    answers = [httpx.get(n["url"] + "/gossip", timeout=5) for n in status["nodes"]]
    if all(r.status_code == 404 for r in answers):
        assert page.locator("#gossip-off").inner_text() == "gossip off"
        return
    assert all(r.status_code == 200 for r in answers)
    members = {m["node"] for r in answers for m in r.json()["members"]}
    page.wait_for_function(
        f"document.querySelectorAll('table.gossip td[data-state=\"alive\"]').length"
        f" >= {len(answers) * len(members)}",
        timeout=20_000,
    )
    rows = page.locator("table.gossip tr").count()
    assert rows == 1 + len(answers)  # a header, then one row per observer


def test_chromium_is_installed():
    """The browser test needs Debian's chromium; missing, this fails (never skips)."""
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium"


def test_page_shows_every_node_and_a_byzantine_node_turns_ejected(cluster, tmp_path: Path):
    status, state_dir = cluster
    url = status["dashboard"]["url"]
    names = [n["name"] for n in status["nodes"]]
    assert len(names) == 6
    state = json.loads((state_dir / "state.json").read_text())
    control = state["tokens"]["control"]
    victim = status["nodes"][2]
    errors: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch(pw, tmp_path / "chromium-profile")
        try:
            page = browser.new_page()
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#link.link-live", timeout=10_000)
            for name in names:
                page.wait_for_selector(f'.card[data-node="{name}"]', timeout=10_000)
            assert page.locator(".card").count() == 6
            _gossip_is_shown(page, status)
            assert page.content().count(control) == 0  # the token stays server-side

            with Load(status["balancer"]["url"]):
                # Every node trusted first, so the ejection below is the switch's doing.
                page.wait_for_selector(
                    f'.card[data-node="{victim["name"]}"][data-state="trusted"]', timeout=30_000
                )
                switched = time.monotonic()
                r = httpx.put(
                    victim["url"] + "/control/fault",
                    json={"type": "byzantine", "probability": 1.0},
                    headers={"Authorization": f"Bearer {control}"},
                    timeout=5,
                )
                assert r.status_code == 200, r.text

                def balancer_ejected() -> bool:
                    rows = httpx.get(status["balancer"]["admin_url"] + "/trust", timeout=5).json()
                    row = next(b for b in rows["backends"] if b["url"] == victim["url"])
                    return row["state"] == "ejected"

                wait_until(balancer_ejected, EJECT_TIMEOUT_S, "the balancer to eject the victim")
                balancer_took = time.monotonic() - switched
                page.wait_for_selector(
                    f'.card[data-node="{victim["name"]}"][data-state="ejected"]',
                    timeout=PAGE_SLACK_S * 1000,
                )
                page_took = time.monotonic() - switched
            assert page_took <= balancer_took + PAGE_SLACK_S
            card = page.locator(f'.card[data-node="{victim["name"]}"]').inner_text()
            assert "byzantine" in card  # the true fault, beside the verdict
            page.wait_for_selector('#events li[data-kind="fault"]', timeout=5_000)
            page.wait_for_selector('#events li[data-kind="eject"]', timeout=5_000)
            # The reason is the balancer's own ejection counter's label, as Grafana sees it.
            logged = page.locator('#events li[data-kind="eject"]').first.inner_text()
            assert re.search(r"ejected \((model|proven_liar|health|gossip)\)", logged), logged
            # a vertical mark has no width, so it is "attached" rather than "visible"
            page.wait_for_selector(
                '#trust-chart line[data-kind="eject"]', state="attached", timeout=5_000
            )
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], f"console errors on the page: {errors}"
