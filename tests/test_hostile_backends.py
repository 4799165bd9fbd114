"""Backends that attack their balancer: endless or huge answers, huge heads, trickled or
endless health checks. A real `twlb balancer` process must stay within a stated memory
bound (its RSS sampled by the test) and keep serving clients from the honest backend.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from conftest import Spawn
from twlb.processes.managed import ManagedProcess, free_port, pid_alive

from twlb.work import digest

HOSTILE = Path(__file__).with_name("hostile_backend.py")

#: Cap on one upstream answer body in the body test.
BODY_CAP = 4 * 2**20


#: Bound on the balancer's RSS while attacked: at most two copies (chunks, then joined)
#: of one capped answer per try in flight (4 clients, plus audits and retries: 8), with
#: 64 MiB for the allocator, above its RSS before the attack (about 80 MiB); without caps
#: one 500 MB answer alone took a balancer past 1 GB.
def rss_bound(base: int, cap: int) -> int:
    return base + 8 * 2 * cap + 64 * 2**20


#: The health checks read at most 4 KiB: the attack may cost little more than noise.
HEALTH_RSS_SLACK = 64 * 2**20


class RssSampler:
    """Samples a process's resident memory every 50 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def start_hostile(modes: list[str], tmp_path: Path) -> tuple[list[ManagedProcess], list[str]]:
    procs, urls = [], []
    for mode in modes:
        port = free_port()
        procs.append(
            ManagedProcess(
                [sys.executable, str(HOSTILE), str(port), mode], log_path=tmp_path / f"{mode}.log"
            ).start()
        )
        urls.append(f"http://127.0.0.1:{port}")
    for proc, url in zip(procs, urls, strict=True):
        # Not /healthz: in the health modes it never ends (that is the attack).
        proc.wait_ready(url + "/ready", timeout=20)
    return procs, urls


def stop_all(procs: list[ManagedProcess]) -> None:
    for proc in procs:
        proc.stop()
    for proc in procs:
        assert not pid_alive(proc.pid)


def test_huge_and_endless_answers_fail_their_tries_and_the_balancer_stays_bounded(
    spawn: Spawn, tmp_path: Path
) -> None:
    hostile, urls = start_hostile(
        ["huge-body", "endless-body", "huge-head", "many-headers"], tmp_path
    )
    try:
        _, honest = spawn("backend", "--node-id", "honest", "--no-simulation")
        backends = [a for u in [*urls, honest] for a in ("--backend", u)]
        proc, balancer = spawn(
            "balancer",
            *backends,
            "--policy",
            "round-robin",
            "--max-tries",
            "5",
            "--retry-budget",
            "10",
            "--try-timeout",
            "5",
            "--health-interval",
            "0.5",
            "--upstream-max-body-bytes",
            str(BODY_CAP),
            "--log-level",
            "warning",
        )
        bound = rss_bound(psutil.Process(proc.pid).memory_info().rss, BODY_CAP)
        keys = [f"k{i}" for i in range(80)]

        def ask(key: str) -> tuple[int, str | None]:
            r = httpx.get(balancer + "/work", params={"key": key}, timeout=30)
            return r.status_code, r.json().get("digest") if r.status_code == 200 else None

        with RssSampler(proc.pid) as rss, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, keys))
        assert answers == [(200, digest(k)) for k in keys]  # every client answered right
        assert rss.peak < bound, f"peak RSS {rss.peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f}"
        resident = psutil.Process(proc.pid).memory_info().rss
        assert resident < bound
        metrics = httpx.get(balancer + "/metrics", timeout=10).text
        for url in urls:  # every attacker's tries failed as bad upstream answers
            assert (
                f'twlb_balancer_upstream_requests_total{{backend="{url}",outcome="error"}}'
                in metrics
            )
    finally:
        stop_all(hostile)


def test_endless_and_trickled_health_checks_fail_within_their_deadline(
    spawn: Spawn, tmp_path: Path
) -> None:
    hostile, urls = start_hostile(["endless-health", "trickle-health"], tmp_path)
    try:
        _, honest = spawn("backend", "--node-id", "honest", "--no-simulation")
        backends = [a for u in [*urls, honest] for a in ("--backend", u)]
        proc, balancer = spawn(
            "balancer",
            *backends,
            "--policy",
            "round-robin",
            "--health-interval",
            "0.3",
            "--health-timeout",
            "0.5",
            "--log-level",
            "warning",
        )
        bound = psutil.Process(proc.pid).memory_info().rss + HEALTH_RSS_SLACK
        with RssSampler(proc.pid) as rss:
            deadline = time.monotonic() + 20  # two failed checks take ~1.6 s; margin for load
            up = {}
            while time.monotonic() < deadline:
                rows = httpx.get(balancer + "/trust", timeout=10).json()["backends"]
                up = {row["url"]: row["up"] for row in rows}
                if up == {urls[0]: False, urls[1]: False, honest: True}:
                    break
                time.sleep(0.2)
            assert up == {urls[0]: False, urls[1]: False, honest: True}
            for i in range(20):
                r = httpx.get(balancer + "/work", params={"key": f"h{i}"}, timeout=10)
                assert r.json()["digest"] == digest(f"h{i}")
        assert rss.peak < bound, f"peak RSS {rss.peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f}"
    finally:
        stop_all(hostile)
