"""A backend that attacks its balancer: run as `python tests/hostile_backend.py PORT MODE`.

Modes (`/ready` always answers 200 "ok"; every other path but /healthz answers by mode;
/healthz answers 200 "ok" unless the mode is about /healthz):
- endless-health: /healthz streams an endless chunked body;
- trickle-health: /healthz trickles one byte every 0.2 s, forever;
- huge-body: every other path answers 200 with a 500 MB body (Content-Length set);
- huge-unless-good: /work with a key starting "good" is answered right (the work
  contract's JSON), every other request as in huge-body;
- endless-body: every other path answers 200 with an endless chunked body;
- huge-head: every other path answers with a 64 MiB header line;
- many-headers: every other path answers with 100,000 header lines.
The balancer must read none of these whole. Used by tests/test_hostile_backends.py and
tests/test_hostile_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import parse_qsl, urlsplit

from twlb.work import digest

CHUNK = b"x" * 65536


async def _send_forever(
    writer: asyncio.StreamWriter, head: bytes, piece: bytes, pause: float
) -> None:
    writer.write(head)
    while True:
        writer.write(piece)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            health = path.startswith(b"/healthz")
            if path == b"/ready":  # readiness for the test harness, in every mode
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif health and mode == "endless-health":
                chunk = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
                await _send_forever(
                    writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk, 0
                )
            elif health and mode == "trickle-health":
                await _send_forever(
                    writer, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"o", 0.2
                )
            elif health or mode.endswith("-health"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif mode == "huge-unless-good" and (good := _good_work(path)) is not None:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(good), good))
            elif mode in ("huge-body", "huge-unless-good"):
                await _send_forever(
                    writer, b"HTTP/1.1 200 OK\r\nContent-Length: 500000000\r\n\r\n", CHUNK, 0
                )
            elif mode == "endless-body":
                chunk = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
                await _send_forever(
                    writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk, 0
                )
            elif mode == "huge-head":
                await _send_forever(writer, b"HTTP/1.1 200 OK\r\nX-Big: ", CHUNK, 0)
            elif mode == "many-headers":
                writer.write(
                    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 100_000 + b"Content-Length: 0\r\n\r\n"
                )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _good_work(target: bytes) -> bytes | None:
    """The right answer to GET /work?key=good...; None for any other request."""
    parts = urlsplit(target.decode("latin-1"))
    query = dict(parse_qsl(parts.query))
    key = query.get("key", "")
    if parts.path != "/work" or not key.startswith("good"):
        return None
    rounds = int(query.get("rounds", "1"))
    answer = {"node": "selective", "key": key, "rounds": rounds, "digest": digest(key, rounds)}
    return json.dumps(answer).encode()


async def main(port: int, mode: str) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, mode), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
