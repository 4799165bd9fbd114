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
from twlb.balancer.memory import MemoryBudget
from twlb.balancer.settings import BalancerSettings

#: The body of GET /big.
BIG = 1 << 20


class Echo:
    """A handler that answers 200 with what it was asked; /block waits for `gate`, /big
    answers BIG bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bytes]] = []
        self.gate = asyncio.Event()

    async def handle(self, method, path, query, headers, client, server, body) -> Reply:  # noqa: ANN001
        self.calls.append((method, path, body))
        if path == b"/block":
            await self.gate.wait()
        if path == b"/big":
            payload = b"x" * BIG
        else:
            payload = json.dumps({"method": method, "path": path.decode(), "n": len(body)}).encode()
        return Reply(200, [(b"content-length", str(len(payload)).encode())], payload)

    def paths(self, path: bytes) -> int:
        return sum(1 for _, p, _ in self.calls if p == path)

    def too_large(self) -> Reply:
        return json_reply(413, "request body over the limit")

    def over_budget(self, why: str) -> Reply:
        return json_reply(503, why)


def limits(**settings: object) -> ServerLimits:
    """The server's limits as `twlb balancer` builds them from its settings."""
    base: dict[str, object] = {
        "max_body_bytes": 1000,
        "max_head_bytes": 8192,
        "max_request_headers": 50,
        "head_timeout_s": 1.0,
        "body_timeout_s": 1.0,
        "max_connections": 8,
        "memory_budget_bytes": 1 << 20,
        "upstream_max_body_bytes": 4096,
        "model": "heuristic",
    }
    return BalancerSettings.model_validate(base | settings).server_limits


LIMITS = limits()


@contextlib.asynccontextmanager
async def running(
    limits: ServerLimits = LIMITS, budget: MemoryBudget | None = None
) -> AsyncIterator[tuple[HttpServer, Echo, int]]:
    handler = Echo()
    server = HttpServer(handler, limits, budget or MemoryBudget(1 << 20))
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


async def trickle(port: int, head: bytes, pieces: bytes, pause: float) -> tuple[bytes, float]:
    """Send `head`, then `pieces` a byte every `pause` s until the server answers; return
    everything read until it closes, and the seconds from the first byte."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = loop.time()
    writer.write(head)
    with contextlib.suppress(ConnectionError):
        for byte in pieces:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(pause)
            if reader._buffer or reader.at_eof():  # noqa: SLF001 (the answer arrived)
                break
    raw = await asyncio.wait_for(reader.read(), 5)  # and then the connection closes
    writer.close()
    return raw, loop.time() - start


async def held_body(
    port: int, handler: Echo, size: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose `POST /block` of `size` bytes waits at the gate (its body
    charged to the budget until it is answered); returned once the handler has it."""
    waiting = handler.paths(b"/block")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /block HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size
    )
    await blocked(handler, waiting + 1)
    return reader, writer


async def blocked(handler: Echo, n: int) -> None:
    """Wait (up to 5 s) until `n` requests have reached /block."""
    for _ in range(500):
        if handler.paths(b"/block") >= n:
            return
        await asyncio.sleep(0.01)


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
        raw, took = await trickle(port, b"", b"GET / HTTP/1.1\r\nX-Slow: " + b"z" * 100, 0.1)
        # Deadline 1 s, checked by the server's once-a-second tick: answered within ~2 s
        # of the first byte; 6 s of margin for a loaded machine, far below 10 s of trickle.
        assert statuses(raw) == [408]
        assert took < 8
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
        # Strict framing: exactly one Host for HTTP/1.1 (at most one for 1.0), and only
        # HTTP/1.0 and HTTP/1.1 on the request line.
        (b"GET / HTTP/1.1\r\n\r\n", 400, "needs a Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "at most one Host"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "at most one Host"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/2.0 is not supported"),
        (b"GET / HTTP/2.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", 505, "HTTP/2.0"),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "HTTP/0.9 is not supported"),
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


async def test_a_connection_is_closed_by_the_answer_that_reaches_its_request_cap() -> None:
    async with running(limits(keepalive_requests=3)) as (_, handler, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        heads = []
        for i in range(3):  # one at a time, as a client that does not pipeline sends
            writer.write(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
            await reader.readexactly(length)
            heads.append(head)
        assert [b"connection: close" in h for h in heads] == [False, False, True]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the third
        writer.close()
        # Requests queued behind the cap's answer are answered before the close.
        raw = await exchange(
            port, b"".join(f"GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(6))
        )
        assert statuses(raw) == [200] * 6
        assert len(handler.calls) == 9


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running() as (_, handler, port):
        raw = await exchange(
            port, b"".join(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(20))
        )
        assert statuses(raw) == [200] * 20
        assert [c[1] for c in handler.calls] == [f"/{i}".encode() for i in range(20)]


async def test_past_the_cap_a_new_connection_takes_the_place_of_the_longest_waiting() -> None:
    async with running() as (server, _, port):
        held = []
        for _ in range(LIMITS.max_connections):
            held.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.01)  # in this order they start waiting for their client
        slow_reader, slow_writer = held[0]
        slow_writer.write(b"GET /never HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a head, unfinished
        await slow_writer.drain()
        raw = await exchange(port, b"GET /new HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(raw) == [200]  # served: it took the place of the slow head
        evicted = await asyncio.wait_for(slow_reader.read(), 5)
        assert statuses(evicted) == [408]
        assert server.evicted == 1
        reader, writer = held[1]  # the others are still served
        writer.write(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()


async def test_past_the_cap_with_every_connection_being_answered_a_new_one_gets_503() -> None:
    async with running() as (_, handler, port):
        held = []
        for _ in range(LIMITS.max_connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append((reader, writer))
        while handler.paths(b"/block") < LIMITS.max_connections:  # all of them busy
            await asyncio.sleep(0.01)
        raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(raw) == [503]
        assert "too many connections" in json_body(raw)["error"]
        handler.gate.set()
        for reader, writer in held:
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line.startswith(b"HTTP/1.1 200")
            writer.close()


async def test_a_trickled_body_gets_408_at_its_deadline_and_the_connection_closes() -> None:
    async with running() as (_, handler, port):
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        raw, took = await trickle(port, head, b"z" * 100, 0.1)  # 100 s for the whole body
        # Deadline 1 s after the head, checked by the once-a-second tick.
        assert statuses(raw) == [408]
        assert "body not complete within 1.0 s" in json_body(raw)["error"]
        assert took < 8
        assert handler.calls == []


async def test_after_a_413_the_connection_closes_instead_of_reading_the_body() -> None:
    async with running() as (_, handler, port):
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        start = loop.time()
        sent = 0
        raw = b""
        with contextlib.suppress(ConnectionError):
            while loop.time() - start < 20:  # 100 MB at 6.4 MB/s: about 16 s if it were read
                writer.write(b"x" * 65536)
                await writer.drain()
                sent += 65536
                await asyncio.sleep(0.01)
                raw = raw or bytes(reader._buffer)  # noqa: SLF001 (the answer, once it came)
        closed_after = loop.time() - start
        writer.close()
        assert statuses(raw) == [413]
        # Refused at the head; the lingering close ends LINGER_S (2 s) later, however fast
        # the client goes on sending: it is not read to the end at the sender's pace.
        assert closed_after < 10, f"still read after {closed_after:.1f} s ({sent} bytes)"
        assert handler.calls == []


async def test_a_client_that_half_closed_is_closed_once_answered_not_lingered_on() -> None:
    """The lingering close is for a client still sending; one that has sent its EOF has
    nothing more to send, so its connection goes once its answer is out: answered (200)
    or refused (400) before the EOF arrived, and a server stop waits for neither."""
    async with running() as (server, _, port):
        loop = asyncio.get_running_loop()
        for request, status in (
            (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 200),
            (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        ):
            raw = await exchange(port, request)
            assert statuses(raw) == [status]
            start = loop.time()
            while server.connections and loop.time() - start < 1.0:
                await asyncio.sleep(0.01)
            assert not server.connections, f"answered {status}: still open after 1 s"
        start = loop.time()
    assert loop.time() - start < 0.5  # the stop had no connection to wait for


async def test_a_pipelined_flood_on_one_connection_does_not_hold_up_another() -> None:
    async with running(limits(max_connections=100)) as (_, handler, port):
        _, flood = await asyncio.open_connection("127.0.0.1", port)
        flood.write(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)  # one write, never read
        await flood.drain()
        while not handler.paths(b"/f"):
            await asyncio.sleep(0)
        raw = await exchange(port, b"GET /good HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(raw) == [200]
        # Answered one per loop turn, the flood had a few dozen answers by then, not its
        # 2,000 (which the server once answered without yielding).
        served = handler.paths(b"/f")
        assert served < 200, served
        flood.close()


async def test_a_client_that_reads_no_answer_stops_being_served_and_is_dropped() -> None:
    budget = MemoryBudget(64 << 20)
    async with running(limits(send_timeout_s=1.0), budget) as (server, handler, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 16)  # never read
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + 10
        charged = 0
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            if handler.paths(b"/big") and budget.used:
                charged = budget.used  # its unread answers are held against the budget
            if charged and not server.connections:
                break  # dropped (an abort: the client sees a reset, not an EOF)
        # Served until its write buffer was full (the kernel's socket buffers take a few
        # MiB first), then nothing more; dropped at the send deadline, its memory given back.
        assert handler.paths(b"/big") < 16
        assert charged > 0
        assert not server.connections
        assert budget.used == 0
        writer.close()


async def test_a_body_the_memory_budget_has_no_room_for_gets_503_with_the_reason() -> None:
    budget = MemoryBudget(1500)
    async with running(LIMITS, budget) as (_, handler, port):
        held_reader, held_writer = await held_body(port, handler, 900)
        assert budget.used == 900  # held until it is answered
        post = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n" + b"b" * 900
        raw = await exchange(port, post)
        assert statuses(raw) == [503]
        assert "memory budget is spent (900 of 1500 bytes" in json_body(raw)["error"]
        chunked = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = await exchange(port, chunked + b"259\r\n" + b"c" * 601 + b"\r\n0\r\n\r\n")
        assert statuses(raw) == [503]  # counted as it arrives, without a length
        handler.gate.set()
        assert (await asyncio.wait_for(held_reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        held_writer.close()
        assert budget.used == 0
        raw = await exchange(port, post)
        assert statuses(raw) == [200]
        assert budget.used == 0


async def test_a_body_without_a_length_leaves_the_last_eighth_to_bodies_known_small() -> None:
    """Uploads without a length, however small so far, may not take the budget's last
    eighth: many of them at once would leave no room for the small answers."""
    budget = MemoryBudget(80_000)  # bodies over SMALL_BODY_BYTES may use 70,000 of it
    async with running(limits(max_body_bytes=100_000), budget) as (_, handler, port):
        held_reader, held_writer = await held_body(port, handler, 66000)
        assert budget.used == 66000  # held until it is answered
        chunked = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = await exchange(port, chunked + b"259\r\n" + b"c" * 601 + b"\r\n0\r\n\r\n")
        assert statuses(raw) == [503]  # 4,096 charged as a large body: past 70,000
        small = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b"b" * 4000
        raw = await exchange(port, small)
        assert statuses(raw) == [200]  # known to be small: the last eighth is its
        handler.gate.set()
        assert (await asyncio.wait_for(held_reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        held_writer.close()


async def test_input_held_in_an_upload_is_charged_as_the_upload_not_from_the_last_eighth() -> None:
    """Input read ahead in the middle of a body without a length (held while requests
    queued before it are answered) is charged as that body: past the large bodies' share
    the upload is refused instead, and a small request still fits."""
    budget = MemoryBudget(80_000)  # bodies over SMALL_BODY_BYTES may use 70,000 of it
    settings = limits(max_body_bytes=100_000, max_pipelined=1)
    async with running(settings, budget) as (_, handler, port):
        held_reader, held_writer = await held_body(port, handler, 60000)
        # Two requests queued (one over max_pipelined), then an upload: its body's first
        # slice is parsed (4,096 charged), the rest of it is held until answers go out.
        queued_reader, queued_writer = await asyncio.open_connection("127.0.0.1", port)
        queued_writer.write(
            b"GET /block HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"PUT /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"6000\r\n" + b"c" * 0x6000 + b"\r\n0\r\n\r\n"
        )
        await blocked(handler, 2)
        # Held, the rest of the upload (about 20,800 bytes) would have left 80,000 behind.
        assert budget.used == 60000  # refused: its charge and its input given back
        small = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b"b" * 4000
        raw = await exchange(port, small)
        assert statuses(raw) == [200]
        handler.gate.set()
        queued = await asyncio.wait_for(queued_reader.read(), 5)
        # What was queued is answered, then the upload's refusal, and the connection closes.
        assert statuses(queued) == [200, 200, 503]
        assert b"memory budget" in queued.split(b"HTTP/1.1 503")[-1]
        assert handler.paths(b"/up") == 0
        assert (await asyncio.wait_for(held_reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        held_writer.close()
        queued_writer.close()


async def test_a_chunked_body_in_two_byte_chunks_arrives_whole() -> None:
    async with running() as (_, handler, port):
        head = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = await exchange(port, head + b"2\r\nab\r\n" * 450 + b"0\r\n\r\n")
        assert statuses(raw) == [200]
        assert handler.calls == [("POST", b"/up", b"ab" * 450)]


async def test_shutdown_answers_503_to_what_it_cannot_finish() -> None:
    handler = Echo()
    server = HttpServer(handler, LIMITS, MemoryBudget(1 << 20))
    await server.start("127.0.0.1", 0)
    assert server.sockname is not None
    port = server.sockname[1]
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(
        b"GET /block HTTP/1.1\r\nHost: x\r\n\r\nGET /queued HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    half_reader, half_writer = await asyncio.open_connection("127.0.0.1", port)
    half_writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    while not handler.paths(b"/block") or len(server.connections) < 3:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.stop(grace_s=0.5)
    assert loop.time() - started < 3
    busy = await asyncio.wait_for(busy_reader.read(), 5)
    assert statuses(busy) == [503, 503]  # cut at the grace, and the one queued behind it
    assert busy.count(b"shutting down") == 2 and busy.endswith(b"}")
    assert b"connection: close" in busy.split(b"HTTP/1.1 503")[-1]
    half = await asyncio.wait_for(half_reader.read(), 5)
    assert statuses(half) == [503]  # its body will not be read to the end now
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle: closed
    assert handler.paths(b"/queued") == 0 and handler.paths(b"/up") == 0
    for w in (busy_writer, half_writer, idle_writer):
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
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(_TOKENS, st.binary(max_size=20)), max_size=30))
def test_fuzzed_request_bytes_never_get_a_server_error_or_a_dead_connection(
    parts: list[bytes],
) -> None:
    async def run() -> None:
        async with running() as (_, _, port):
            raw = await exchange(port, b"".join(parts), read_s=5.0)  # EOF within 5 s: not dead
            # 505 is the one 5xx given on purpose: a request line naming an HTTP version
            # other than 1.x (tested above); any other 5xx would be the server failing.
            assert all(s < 500 or s == 505 for s in statuses(raw)), raw[:200]
            ok = await exchange(port, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            assert statuses(ok) == [200]

    asyncio.run(run())
