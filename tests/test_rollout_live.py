"""Rollouts that drop nothing, on `twlb up`'s three balancer replicas.

- `twlb rollout restart` while `twlb load --mode basic --rate 200` runs: no request
  fails, and a liar proven before stays out of every replica's rotation through it (each
  restarted replica reads its evidence back and its peers' before it serves).
- SIGTERM to a replica while 200 slow requests are in flight: every one completes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import httpx
from conftest import wait_until
from test_replicas_live import start_up, stop_up
from twlb.processes.managed import pid_alive, twlb_argv

from twlb.work import digest

LIAR = """\
    - {index: 0, fault: {type: byzantine, probability: 1.0}}"""


#: The load during the rollout: it starts 3 s before the rollout and goes on after it.
LOAD_RATE, LOAD_S = 200, 16


def test_rollout_restart_under_load_fails_no_request_and_keeps_a_liar_out(tmp_path) -> None:
    up = start_up(tmp_path, "roll", LIAR, 4, "trust")
    try:
        liar = up.node_url(0)

        # First, the liar is proven: light load until every replica has it out.
        warm = up.load("warm", rate=50, duration=20)

        def proven_everywhere() -> bool:
            try:
                return all(up.trust(a)[liar]["evidence"]["proven"] for a in up.admins)
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_until(proven_everywhere, 20, "the liar proven by every replica")
        warm.stop()
        before = {r["name"]: r["pid"] for r in up.state()["balancer"]["replicas"]}

        # Then the rollout, under load. While it runs, every replica that answers must have
        # the liar out (a restarted one reads its evidence before it serves).
        stop = threading.Event()
        readmitted: list[tuple[str, dict]] = []

        def watch() -> None:
            while not stop.is_set():
                for admin in up.admins:
                    try:
                        if httpx.get(admin + "/readyz", timeout=1).status_code != 200:
                            continue
                        row = up.trust(admin)[liar]
                    except (httpx.HTTPError, ValueError, KeyError):
                        continue  # restarting
                    if row["state"] != "ejected":
                        readmitted.append((admin, row))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        load = up.load("roll", rate=LOAD_RATE, duration=LOAD_S)
        began = time.monotonic()
        time.sleep(3)
        rollout = subprocess.run(
            twlb_argv("rollout", "restart", "--state-dir", str(up.state_dir)),
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        rolled_in = time.monotonic() - began
        assert rollout.returncode == 0, rollout.stderr
        # The load went on for a while after the last replica was back (each one restarts
        # in about 1.5 s), so what follows the rollout is measured too.
        assert rolled_in < LOAD_S - 3, f"the rollout took until {rolled_in:.1f} s of {LOAD_S} s"
        assert rollout.stderr.count("drained in") == 3, rollout.stderr
        load.popen.wait(120)  # type: ignore[union-attr]
        stop.set()
        watcher.join(30)
        report = up.report("roll")
        print(rollout.stderr.strip(), f"\nload: {report['sent']} sent, {report['failed']} failed")
        assert report["sent"] >= 0.95 * LOAD_RATE * LOAD_S and report["failed"] == 0, report
        assert report["correct"] == report["sent"], report  # the liar served nothing
        assert not readmitted, readmitted[:3]
        after = {r["name"]: r["pid"] for r in up.state()["balancer"]["replicas"]}
        assert set(after) == set(before) and not set(after.values()) & set(before.values())
        assert not any(pid_alive(p) for p in before.values())
        for admin in up.admins:
            assert up.trust(admin)[liar]["evidence"]["proven"]
    finally:
        stop_up(up)


SLOW = """\
    - {index: 0, fault: {type: delay, delayMs: 1500}}
    - {index: 1, fault: {type: delay, delayMs: 1500}}
    - {index: 2, fault: {type: delay, delayMs: 1500}}"""


async def _slow_requests(url: str, n: int, started: threading.Event) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(i: int) -> tuple[int, str]:
            key = f"slow-{i}"
            r = await client.get("/work", params={"key": key})
            ok = r.status_code == 200 and r.json()["digest"] == digest(key, 1)
            return r.status_code, "correct" if ok else r.text[:200]

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.6)  # all sent; the nodes answer after 1.5 s
        started.set()
        return await asyncio.gather(*tasks)


def test_sigterm_to_a_replica_with_200_slow_requests_in_flight_loses_none(tmp_path) -> None:
    # The nodes answer /work after 1.5 s; the balancer's tries may take 5 s (inherited by
    # the replicas through the environment, as every flag can be).
    up = start_up(tmp_path, "slow", SLOW, 3, "round-robin", TWLB_BALANCER_TRY_TIMEOUT_S="5")
    try:
        victim = up.state()["balancer"]["replicas"][0]
        started = threading.Event()
        results: list = []
        runner = threading.Thread(
            target=lambda: results.extend(asyncio.run(_slow_requests(up.url, 200, started)))
        )
        runner.start()
        assert started.wait(30)
        os.kill(victim["pid"], signal.SIGTERM)
        runner.join(60)
        assert len(results) == 200
        bad = [r for r in results if r != (200, "correct")]
        assert not bad, bad[:5]
        # The replica that was told to stop served its share of them, then exited.
        lines = [x for x in up.access_lines() if x["replica"] == victim["name"]]
        print(f"{victim['name']} answered {len(lines)} of the 200 while draining")
        assert lines and all(x["status"] == 200 for x in lines)
        wait_until(lambda: not pid_alive(victim["pid"]), 20, "the replica to exit")
    finally:
        stop_up(up)


def test_rollout_restart_needs_a_running_cluster(tmp_path) -> None:
    out = subprocess.run(
        twlb_argv("rollout", "restart", "--state-dir", str(tmp_path / "none")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr
