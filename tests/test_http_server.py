"""The balancer's HTTP/1.1 server on raw sockets: limits as bytes arrive, statuses, states.

Each test runs a real `HttpServer` on loopback in the test's own event loop with a small
handler that answers 200 (or records what it was given), and talks to it byte by byte as
a hostile or odd client would (the way h11 tests its state machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twlb.balancer.http_server import (
    TRANSITIONS,
    ConnState,
    HttpServer,
    Reply,
    ServerLimits,
    json_reply,
)


class Echo:
    """A handler that answers 200 with what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bytes]] = []

    async def handle(self, method, path, query, headers, client, server, body) -> Reply:  # noqa: ANN001
        self.calls.append((method, path, body))
        payload = json.dumps({"method": method, "path": path.decode(), "n": len(body)}).encode()
        return Reply(200, [(b"content-length", str(len(payload)).encode())], payload)

    def too_large(self) -> Reply:
        return json_reply(413, "request body over the limit")


LIMITS = ServerLimits(
    max_body_bytes=1000,
    max_head_bytes=8192,
    max_headers=50,
    head_timeout_s=1.0,
    max_connections=8,
)


@contextlib.asynccontextmanager
async def running(limits: ServerLimits = LIMITS) -> AsyncIterator[tuple[HttpServer, Echo, int]]:
    handler = Echo()
    server = HttpServer(handler, limits)
    await server.start("127.0.0.1", 0)
    try:
        assert server.sockname is not None
        yield server, handler, server.sockname[1]
    finally:
        await server.stop(grace_s=1.0)


async def exchange(port: int, *chunks: bytes, pause: float = 0.0, read_s: float = 5.0) -> bytes:
    """Send the chunks, half-close, and read everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), read_s)
    finally:
        writer.close()


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def json_body(raw: bytes) -> dict:
    return json.loads(raw[raw.index(b"\r\n\r\n") + 4 :])


def test_the_state_table_is_closed_and_every_state_can_end() -> None:
    assert set(TRANSITIONS) == set(ConnState)
    for state, targets in TRANSITIONS.items():
        assert targets <= set(ConnState)
        if state is not ConnState.CLOSED:
            assert ConnState.CLOSED in targets or ConnState.DRAINING in targets


async def test_a_header_line_without_end_is_refused_at_the_limit_not_buffered() -> None:
    async with running() as (server, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nX-Big: ")
        sent = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):  # up to 64 MiB, stopping once the server answers
                writer.write(b"a" * 65536)
                await writer.drain()
                sent += 65536
                await asyncio.sleep(0.01)  # let the server (same loop) read what was sent
                if reader.at_eof() or reader._buffer:  # noqa: SLF001 (the answer arrived)
                    break
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert statuses(raw) == [431]
        assert "8192" in json_body(raw)["error"]
        assert sent < 16 * 65536  # refused within a few chunks of the limit, not at 64 MiB


async def test_too_many_header_lines_get_431_whatever_their_size() -> None:
    async with running() as (_, handler, port):
        raw = await exchange(port, b"GET / HTTP/1.1\r\n" + b"X:\r\n" * 10_000 + b"\r\n")
        assert statuses(raw) == [431]
        assert "50 header lines" in json_body(raw)["error"]
        assert handler.calls == []


async def test_slowloris_is_closed_by_the_head_deadline_whatever_it_trickles() -> None:
    async with running() as (_, handler, port):
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = loop.time()
        raw = b""
        with contextlib.suppress(ConnectionError):
            for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"z" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
                if reader._buffer or reader.at_eof():  # noqa: SLF001
                    break
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # Deadline 1 s, checked by the server's once-a-second tick: answered within ~2 s
        # of the first byte; 6 s of margin for a loaded machine, far below 10 s of trickle.
        assert statuses(raw) == [408]
        assert loop.time() - start < 8
        assert handler.calls == []


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (b"GET http://[bad/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request target"),
        (b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n", 405, "CONNECT"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "malformed"),
        (
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            400,
            "malformed",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed"),
    ],
)
async def test_malformed_or_unsupported_requests_get_a_4xx_with_a_json_reason(
    request_bytes: bytes, status: int, words: str
) -> None:
    async with running() as (_, handler, port):
        raw = await exchange(port, request_bytes)
        assert statuses(raw) == [status]
        assert words in json_body(raw)["error"]
        assert handler.calls == []


async def test_an_upgrade_request_gets_one_answer_and_the_connection_closes() -> None:
    async with running() as (_, handler, port):
        raw = await exchange(
            port,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"\x81\x05hello",  # what a client sends after an upgrade it assumed
        )
        assert statuses(raw) == [200]  # answered as plain HTTP: the upgrade is refused
        assert b"connection: close" in raw
        assert len(handler.calls) == 1


async def test_http_1_0_keep_alive_is_answered_as_kept_and_plain_1_0_is_closed() -> None:
    async with running() as (_, handler, port):
        req = b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        raw = await exchange(port, req, req.replace(b"keep-alive", b"close"))
        assert statuses(raw) == [200, 200]
        first, second = raw.split(b"HTTP/1.1 ")[1:]
        assert b"connection: keep-alive" in first
        assert b"connection: close" in second
        raw = await exchange(port, b"GET /b HTTP/1.0\r\n\r\n", b"GET /c HTTP/1.0\r\n\r\n")
        assert statuses(raw) == [200]  # closed after the first, as HTTP/1.0 does
        assert len(handler.calls) == 3


async def test_an_early_413_reaches_a_client_still_sending_its_body() -> None:
    async with running() as (_, handler, port):
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
        raw = await exchange(port, head, *([b"x" * 65536] * 8))
        assert statuses(raw) == [413]
        assert handler.calls == []


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running() as (_, handler, port):
        raw = await exchange(
            port, b"".join(f"GET /{i} HTTP/1.1\r\n\r\n".encode() for i in range(20))
        )
        assert statuses(raw) == [200] * 20
        assert [c[1] for c in handler.calls] == [f"/{i}".encode() for i in range(20)]


async def test_connections_over_the_cap_get_503_and_earlier_ones_are_served() -> None:
    async with running() as (_, _, port):
        held = [
            await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS.max_connections)
        ]
        raw = await exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        assert statuses(raw) == [503]
        reader, writer = held[0]
        writer.write(b"GET /still HTTP/1.1\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()


_TOKENS = st.sampled_from(
    [
        b"GET ",
        b"POST ",
        b"CONNECT ",
        b"/",
        b"http://[",
        b"?",
        b"#",
        b" HTTP/1.1",
        b" HTTP/1.0",
        b"\r\n",
        b"\n",
        b"\r",
        b"Host: x",
        b"Content-Length: 5",
        b"Content-Length: -1",
        b"Transfer-Encoding: chunked",
        b"Connection: Upgrade",
        b"Upgrade: h2c",
        b"Expect: 100-continue",
        b":",
        b" ",
        b"0\r\n\r\n",
        b"5\r\nhello\r\n",
        b"\x00",
        b"\xff",
        b"abc",
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(_TOKENS, st.binary(max_size=20)), max_size=30))
def test_fuzzed_request_bytes_never_get_a_5xx_or_a_dead_connection(parts: list[bytes]) -> None:
    async def run() -> None:
        async with running() as (_, _, port):
            raw = await exchange(port, b"".join(parts), read_s=5.0)  # EOF within 5 s: not dead
            assert all(s < 500 for s in statuses(raw)), raw[:200]
            ok = await exchange(port, b"GET /after HTTP/1.1\r\n\r\n")
            assert statuses(ok) == [200]

    asyncio.run(run())
