"""TLS at both ends of the balancer, with certificates this test makes (trustme): an
https:// backend verified against a CA bundle (`--backend-ca-file`), and the listener
serving HTTPS (`--tls-cert-file`, `--tls-key-file`). The backend is a real HTTPS server
on loopback in the test's event loop; the balancer a real `twlb balancer` process.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme
from aiohttp import web
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv


async def _https_backend(ca: trustme.CA) -> tuple[web.AppRunner, int]:
    async def work(request: web.Request) -> web.Response:
        return web.json_response({"digest": "d", "node": "tls", "scheme": request.scheme})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_get("/healthz", healthz)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


@pytest.fixture
async def backend() -> AsyncIterator[tuple[trustme.CA, int]]:
    ca = trustme.CA()
    runner, port = await _https_backend(ca)
    try:
        yield ca, port
    finally:
        await runner.cleanup()


def _balancer(tmp_path: Path, name: str, *args: str) -> tuple[ManagedProcess, int, int]:
    port, admin = free_port(), free_port()
    proc = ManagedProcess(
        twlb_argv(
            "balancer", "--port", str(port), "--admin-port", str(admin), "--gossip-poll", "0",
            "--model", "heuristic", "--health-interval", "0.2", *args,
        ),
        log_path=tmp_path / f"{name}.log",
    ).start()  # fmt: skip
    return proc, port, admin


async def test_an_https_backend_is_verified_and_the_listener_serves_https(
    tmp_path: Path, backend
) -> None:
    ca, port = backend
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(bundle)
    listener = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    for blob in listener.cert_chain_pems:
        blob.write_to_path(chain, append=True)
    listener.private_key_pem.write_to_path(key)
    proc, lb_port, admin = _balancer(
        tmp_path, "tls", "--backend", f"https://localhost:{port}", "--backend-ca-file",
        str(bundle), "--tls-cert-file", str(chain), "--tls-key-file", str(key),
    )  # fmt: skip
    try:
        await asyncio.to_thread(proc.wait_ready, f"http://127.0.0.1:{admin}/readyz", 60)
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=bundle)) as c:
            r = await c.get(f"https://localhost:{lb_port}/work", params={"key": "k"})
            assert r.status_code == 200 and r.json()["scheme"] == "https"
            assert r.json()["node"] == "tls"
        # Plain HTTP to the TLS listener is no request at all.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{lb_port}/work", timeout=3)
    finally:
        proc.stop()


async def test_a_backend_whose_certificate_the_bundle_does_not_vouch_for_is_refused(
    tmp_path: Path, backend
) -> None:
    _, port = backend
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(other)
    proc, lb_port, admin = _balancer(
        tmp_path, "wrong-ca", "--backend", f"https://localhost:{port}", "--backend-ca-file",
        str(other), "--backend-header",
    )  # fmt: skip
    try:
        await asyncio.to_thread(proc.wait_ready, f"http://127.0.0.1:{admin}/healthz", 60)
        async with httpx.AsyncClient() as c:
            r = await c.get(f"http://127.0.0.1:{lb_port}/work", params={"key": "k"})
        assert r.status_code in (502, 503), r.text  # never the unverified backend's answer
        if r.status_code == 502:
            assert "TLS" in r.json()["error"] or "certificate" in r.json()["error"]
        # Its health checks fail the same way: it is out, and the balancer is not ready.
        async with httpx.AsyncClient() as c:
            for _ in range(50):
                ready = await c.get(f"http://127.0.0.1:{admin}/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["reason"] == "no backend is up"
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--tls-cert-file", "{cert}"], "tls_cert_file and tls_key_file go together"),
        (["--tls-cert-file", "{cert}", "--tls-key-file", "{cert}"], "--tls-cert-file"),
        (["--backend-ca-file", "{cert}"], "--backend-ca-file"),
    ],
)
def test_unusable_tls_files_stop_start_up_in_one_line(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    cert = tmp_path / "not-a-cert.pem"
    cert.write_text("not a certificate\n")
    argv = [a.format(cert=cert) for a in args]
    out = subprocess.run(
        twlb_argv("balancer", "--port", str(free_port()), "--model", "heuristic",
                  "--backend", "https://localhost:1", *argv),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and complaint in out.stderr, out.stderr
