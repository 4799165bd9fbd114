"""The balancer's upstream client: backend URL validation and the stale-connection re-send.

The pool is driven against a raw asyncio server on loopback whose misbehaviour is exact
(it answers the first request on each connection and silently closes on the second), so
what the server received can be counted request by request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.upstream import (
    BackendPool,
    BackendURLError,
    UpstreamConnectError,
    UpstreamTooLarge,
    normalize_backend_url,
)


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
        ("http://backend-1.twlb.svc:9000", "http://backend-1.twlb.svc:9000"),
        ("http://Backend.Example.", "http://backend.example.:80"),
        ("http://[::1]:1", "http://[::1]:1"),
        ("http://localhost:65535", "http://localhost:65535"),
        ("https://backend.example", "https://backend.example:443"),
        ("HTTPS://backend.example:8443/", "https://backend.example:8443"),
    ],
)
def test_good_backend_urls_normalize_to_their_origin(url: str, normal: str) -> None:
    assert normalize_backend_url(url) == normal


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:0", "port must be 1..65535"),
        ("http://127.0.0.1:65536", "malformed backend URL"),  # urllib: port out of range
        ("http://127.0.0.1:-1", "malformed backend URL"),
        ("http://127.0.0.1\x00:8001", "control character"),
        ("http://127.0.0.1:80\x00", "control character"),
        ("http://127.0.0.1 :8001", "space or control character"),
        ("http://a b:1", "space or control character"),
        ("http://a\tb:1", "control character"),
        ("http://-bad.example:1", "neither an IP address nor a DNS name"),
        ("http://bad-.example:1", "neither an IP address nor a DNS name"),
        ("http://under_score.example:1", "neither an IP address nor a DNS name"),
        ("http://a..b:1", "neither an IP address nor a DNS name"),
        (f"http://{'a' * 64}.example:1", "neither an IP address nor a DNS name"),
        ("http://ex%41mple.com:1", "neither an IP address nor a DNS name"),
        ("http://:8001", "has no host"),
        ("ftp://127.0.0.1:8001", "must start with http:// or https://"),
        ("http://user:pw@127.0.0.1:8001", "credentials"),
        ("http://127.0.0.1:8001/work", "must be an origin"),
        ("", "empty"),
    ],
)
def test_bad_backend_urls_are_refused_naming_the_problem(url: str, complaint: str) -> None:
    with pytest.raises(BackendURLError, match=complaint):
        normalize_backend_url(url)


class ForgetfulServer:
    """Answers the first request on each connection (keep-alive, so the client keeps the
    connection) and silently closes the connection on the second, counting what it got."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for n in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.received[method] += 1
                if n == 0:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


@pytest.fixture
async def forgetful() -> AsyncIterator[ForgetfulServer]:
    fs = ForgetfulServer()
    fs.server = await asyncio.start_server(fs._serve, "127.0.0.1", 0)
    yield fs
    fs.server.close()
    await fs.server.wait_closed()


async def test_a_post_is_not_resent_after_a_stale_keep_alive_connection(
    forgetful: ForgetfulServer,
) -> None:
    pool = BackendPool(forgetful.url, BalancerSettings(model="heuristic").upstream_limits)
    try:
        first = await pool.request("GET", b"/work", [], b"", timeout=10.0)
        assert (first.status, first.body) == (200, b"ok")
        # The POST goes out on the kept connection, which the server closes unanswered:
        # it may have been applied, so the try fails rather than sending it again.
        with pytest.raises(UpstreamConnectError):
            await pool.request("POST", b"/work", [], b"payload", timeout=10.0)
    finally:
        pool.close()
    assert forgetful.received == Counter({"GET": 1, "POST": 1})
    assert forgetful.connections == 1


async def test_a_get_is_resent_once_on_a_fresh_connection_after_a_stale_one(
    forgetful: ForgetfulServer,
) -> None:
    pool = BackendPool(forgetful.url, BalancerSettings(model="heuristic").upstream_limits)
    try:
        await pool.request("GET", b"/work", [], b"", timeout=10.0)
        again = await pool.request("GET", b"/work?key=2", [], b"", timeout=10.0)
    finally:
        pool.close()
    assert (again.status, again.body) == (200, b"ok")
    # The first GET, the one lost with the stale connection, and its re-send.
    assert forgetful.received == Counter({"GET": 3})
    assert forgetful.connections == 2


async def test_an_answer_announcing_a_body_over_the_cap_is_refused_on_its_head() -> None:
    """A node announcing 500 MB is refused on its Content-Length: the try fails as too
    large after the head, with none of the body read (the node sends only a few bytes of
    it and keeps the connection open; reading up to the cap would wait for the timeout)."""
    sent_head = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 500000000\r\n\r\nxxxx")
        await writer.drain()
        sent_head.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the balancer hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    limits = BalancerSettings(model="heuristic").upstream_limits
    pool = BackendPool(f"http://{host}:{port}", limits)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTooLarge, match=f"over {limits.max_body_bytes} bytes"):
            await pool.request("GET", b"/work", [], b"", timeout=10.0)
        assert sent_head.is_set() and time.monotonic() - started < 5.0
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
