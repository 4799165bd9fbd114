"""One process serving many honest backends, each on its own loopback port (for fleet_scale.py).

A thousand `twlb backend` processes would not fit a small machine; this serves the same
contract from one asyncio loop: `GET /healthz` answers 200, `GET /work?key=K&rounds=R`
answers the work contract's JSON with the right digest (`twlb.work.digest`), keep-alive,
parsed by httptools. It binds N ports chosen by the kernel, prints them as one JSON line
on stdout, and serves until SIGTERM/SIGINT.

    .venv/bin/python bench/many_backends.py --count 1000
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from urllib.parse import parse_qsl, urlsplit

import click
import httptools
import orjson

from twlb.work import digest


class BackendProtocol(asyncio.Protocol):
    """One keep-alive connection to the backend on `port`."""

    def __init__(self, port: int) -> None:
        self.node = f"port-{port}"
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._answer(400, {"error": "malformed request"}, keep_alive=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        parts = urlsplit(self.url.decode("latin-1"))
        self.url = b""
        keep = self.parser.should_keep_alive()
        if parts.path == "/healthz":
            self._answer(200, {"status": "ok", "node": self.node}, keep)
        elif parts.path == "/work":
            query = dict(parse_qsl(parts.query))
            key, rounds = query.get("key", ""), int(query.get("rounds", "1") or 1)
            body = {"node": self.node, "key": key, "rounds": rounds, "digest": digest(key, rounds)}
            self._answer(200, body, keep)
        else:
            self._answer(404, {"error": "not found"}, keep)

    def _answer(self, status: int, doc: dict, keep_alive: bool) -> None:
        assert self.transport is not None
        body = orjson.dumps(doc)
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
            status,
            reason,
            len(body),
        )
        if not keep_alive:
            head += b"connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()


async def serve(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    ports = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = await loop.create_server(
            lambda port=port: BackendProtocol(port), sock=sock, backlog=64
        )
        servers.append(server)
        ports.append(port)
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


@click.command()
@click.option("--count", default=1000, type=click.IntRange(1, 5000), show_default=True)
def main(count: int) -> None:
    """Serve COUNT honest backends on loopback ports; print the ports as JSON."""
    asyncio.run(serve(count))


if __name__ == "__main__":
    main()
