"""The balancer's admin listener, readiness and drain, its token file and its evidence
file, on real `twlb balancer` and `twlb backend` processes (and the HTTP server's drain
in memory)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from test_http_server import LIMITS, Echo, statuses
from twlb.balancer.http_server import HttpServer
from twlb.balancer.memory import MemoryBudget
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.work import digest


def _start(tmp_path: Path, name: str, service: str, *args: str, **env: str):
    port = free_port()
    proc = ManagedProcess(
        twlb_argv(service, "--host", "127.0.0.1", "--port", str(port), *args),
        env=env or None,
        log_path=tmp_path / f"{name}.log",
    ).start()
    return proc, f"http://127.0.0.1:{port}"


def test_readyz_fails_without_a_backend_up_while_healthz_stays_live(tmp_path: Path) -> None:
    admin = free_port()
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    proc, url = _start(
        tmp_path, "lonely", "balancer", "--admin-port", str(admin), "--backend",
        f"http://127.0.0.1:{free_port()}", "--health-interval", "0.2", "--gossip-poll", "0",
        "--admin-token-file", str(token), "--model", "heuristic",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{admin}"
        proc.wait_ready(base + "/healthz", timeout=60)

        def not_ready() -> bool:
            r = httpx.get(base + "/readyz", timeout=2)
            return r.status_code == 503 and r.json()["reason"] == "no backend is up"

        wait_until(not_ready, 20, "/readyz to fail with its backend down")
        assert httpx.get(base + "/healthz", timeout=2).status_code == 200  # alive all the same
        # The admin API takes the token from the file, and a rotated file at once.
        assert httpx.get(base + "/admin/backends", timeout=2).status_code == 401
        auth = {"Authorization": "Bearer t0k3n"}
        assert httpx.get(base + "/admin/backends", headers=auth, timeout=2).status_code == 200
        token.write_text("n3w\n")
        os.utime(token, (time.time() + 5, time.time() + 5))
        assert httpx.get(base + "/admin/backends", headers=auth, timeout=2).status_code == 401
        new = {"Authorization": "Bearer n3w"}
        assert httpx.get(base + "/admin/backends", headers=new, timeout=2).status_code == 200
        # The traffic port has none of these paths: it proxies (and here: no backend).
        assert httpx.get(url + "/readyz", timeout=2).status_code == 503
        assert "no backend" in httpx.get(url + "/readyz", timeout=2).json()["error"]
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--admin-token", "a", "--admin-token-file", "{file}"], "both given"),
        (["--admin-token-file", "{empty}"], "is empty"),
        (["--listen-fd", "987"], "--listen-fd"),
        (["--peer", "ftp://x:1"], "peer URL"),
        (["--peer-dns", "nohostport"], "HOST:PORT"),
    ],
)
def test_bad_replica_settings_stop_start_up_in_one_line(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "empty").write_text("")
    argv = [a.format(file=tmp_path / "file", empty=tmp_path / "empty") for a in args]
    out = subprocess.run(
        twlb_argv("balancer", "--port", str(free_port()), "--model", "heuristic", *argv),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and complaint in out.stderr, out.stderr


def test_a_restarted_balancer_keeps_its_proven_liar_out_from_its_evidence_file(
    tmp_path: Path,
) -> None:
    quiet = ("--no-simulation", "--no-gossip", "--log-level", "warning")
    nodes = [_start(tmp_path, f"n{i}", "backend", "--node-id", f"n{i}", *quiet) for i in range(2)]
    liar = _start(
        tmp_path, "liar", "backend", "--node-id", "liar", "--fault-type", "byzantine", *quiet
    )
    evidence = tmp_path / "evidence.json"
    admin = free_port()
    args = [
        "--policy", "trust", "--model", "heuristic", "--audit-fraction", "0.5",
        "--gossip-poll", "0", "--admin-port", str(admin), "--evidence-file", str(evidence),
        "--liar-backoff", "300", "--log-level", "warning",
        *(a for _, u in (*nodes, liar) for a in ("--backend", u)),
    ]  # fmt: skip
    procs = [p for p, _ in (*nodes, liar)]
    try:
        for p, u in (*nodes, liar):
            p.wait_ready(u + "/healthz", timeout=60)
        first, url = _start(tmp_path, "first", "balancer", *args)
        procs.append(first)
        first.wait_ready(f"http://127.0.0.1:{admin}/readyz", timeout=60)
        i = 0

        def proven() -> bool:
            nonlocal i
            for _ in range(10):
                i += 1
                httpx.get(url + "/work", params={"key": f"k{i}"}, timeout=5)
            rows = httpx.get(f"http://127.0.0.1:{admin}/trust", timeout=5).json()["backends"]
            return any(r["url"] == liar[1] and r["evidence"]["proven"] for r in rows)

        wait_until(proven, 30, "the liar proven")
        wait_until(evidence.exists, 5, "the evidence file")
        first.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert first.popen.wait(30) in (0, -signal.SIGTERM)  # type: ignore[union-attr]
        written = json.loads(evidence.read_text())
        assert written["evidence"]["backends"][liar[1]]["standing"] == "proven"

        second, url2 = _start(tmp_path, "second", "balancer", *args)
        procs.append(second)
        second.wait_ready(f"http://127.0.0.1:{admin}/readyz", timeout=60)
        rows = httpx.get(f"http://127.0.0.1:{admin}/trust", timeout=5).json()["backends"]
        row = next(r for r in rows if r["url"] == liar[1])
        assert row["state"] == "ejected" and row["evidence"]["proven"]
        left = row["evidence"]["backoff_until"] - time.monotonic()
        assert 250 < left <= 300  # its back-off goes on, less the time it lay
        # Not one answer from the liar: it was out before the listener opened.
        for k in range(60):
            r = httpx.get(url2 + "/work", params={"key": f"after-{k}"}, timeout=5)
            assert r.json()["digest"] == digest(f"after-{k}", 1), r.json()
    finally:
        for p in procs:
            p.stop()


async def test_a_draining_server_serves_what_it_has_and_closes_each_connection() -> None:
    handler = Echo()
    server = HttpServer(handler, LIMITS, MemoryBudget(1 << 20))
    await server.start("127.0.0.1", 0)
    port = server.sockname[1]  # type: ignore[index]
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
    busy_w.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\nGET /queued HTTP/1.1\r\nHost: x\r\n\r\n")
    open_r, open_w = await asyncio.open_connection("127.0.0.1", port)
    open_w.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    while not handler.paths(b"/block") or not handler.paths(b"/one"):
        await asyncio.sleep(0.01)
    await open_r.readuntil(b"}")  # answered, kept open
    stopping = asyncio.create_task(server.stop(grace_s=5.0))
    await asyncio.sleep(0.2)
    # New connections are refused; one already open still gets an answer, then closes.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    open_w.write(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    two = await asyncio.wait_for(open_r.read(), 5)
    assert statuses(two) == [200] and b"connection: close" in two
    handler.gate.set()  # the request in progress finishes within the drain
    busy = await asyncio.wait_for(busy_r.read(), 5)
    assert statuses(busy) == [200, 200]  # and the one queued behind it is served too
    await asyncio.wait_for(stopping, 10)
    assert not server.connections
    for w in (busy_w, open_w):
        w.close()


def test_a_replica_that_finds_itself_among_its_peers_leaves_itself_out(tmp_path: Path) -> None:
    # On Kubernetes the peers' DNS name resolves to every replica's address, its own too.
    admin = free_port()
    token = tmp_path / "token"
    token.write_text("t\n")
    node, node_url = _start(tmp_path, "node", "backend", "--no-simulation", "--no-gossip")
    proc, _ = _start(
        tmp_path, "self", "balancer", "--admin-port", str(admin), "--backend", node_url,
        "--admin-token-file", str(token), "--peer-dns", f"localhost:{admin}",
        "--replica-id", "only", "--peer-sync", "0.1", "--gossip-poll", "0",
        "--model", "heuristic",
    )  # fmt: skip
    try:
        proc.wait_ready(f"http://127.0.0.1:{admin}/readyz", timeout=60)
        time.sleep(1.0)  # several sync rounds
        doc = httpx.get(
            f"http://127.0.0.1:{admin}/admin/evidence",
            headers={"Authorization": "Bearer t"},
            timeout=5,
        ).json()
        assert doc["replica"] == "only" and doc["peers"] == {}
        assert doc["exchanges"]["refused"] == 0
    finally:
        proc.stop()
        node.stop()
