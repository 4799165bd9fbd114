"""The backend node's HTTP server: uvicorn on uvloop and httptools, with the limits on a
request head that uvicorn's httptools protocol does not have.

uvicorn feeds every byte a client sends to the parser, which keeps a header line until
it ends: endless header lines took a node past 4 GiB in 27 s, and a connection that
never finishes its head was never closed. `limited_protocol(limits)` is uvicorn's
protocol with the node's head limits (`BackendSettings.head_limits`), enforced as bytes
arrive: a head over `max_head_bytes` or with more than `max_headers` lines gets 431,
one not complete `head_timeout_s` after its first byte (or after the connection opened)
gets 408. The answer is a JSON `{"error": ...}` as the node's others; the connection is
then half-closed and read and dropped for `LINGER_S` (so the answer is not lost to a
reset), then closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

#: Seconds a refused connection keeps reading (and dropping) before it closes.
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What a request head may weigh and take (declared in BackendSettings)."""

    max_head_bytes: int
    max_headers: int
    head_timeout_s: float


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size, header count and head time limits."""

    limits: HeadLimits  # set on the subclass `limited_protocol` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._header_lines = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a connection that never sends a head is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: read and dropped
        if self._in_head:
            if self._head_timer is None:
                self._start_head_timer()
            # Counted as bytes arrive: the parser would keep a header line without end.
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and not self._refused and self._head_bytes > self.limits.max_head_bytes:
            self._refuse(431, f"request head over {self.limits.max_head_bytes} bytes")

    # parser callbacks
    def on_message_begin(self) -> None:
        self._header_lines = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines += 1
        if self._header_lines > self.limits.max_headers:
            self._refusal = (431, f"request has more than {self.limits.max_headers} header lines")
            raise ValueError("too many headers")  # the parser raises HttpParserError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error: a refusal of ours answers as itself."""
        status, reason = self._refusal or (400, msg)
        self._refuse(status, reason)

    # internals
    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_expired)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:
                reason = f"request head not complete within {self.limits.head_timeout_s} s"
                self._refuse(408, reason)
            else:
                self.transport.close()  # nothing was asked: nothing to answer

    def _refuse(self, status: int, reason: str) -> None:
        if self._refused:
            return
        self._refused = True
        self._stop_head_timer()
        body = orjson.dumps({"error": reason})
        transport = self.transport
        transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()


def limited_protocol(limits: HeadLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class with these head limits."""
    return type("NodeHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def server_config(
    app: Any, host: str, port: int, log_level: str, limits: HeadLimits
) -> uvicorn.Config:
    """How a node is served: one uvicorn worker on uvloop and httptools with the head
    limits, no access log."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=limited_protocol(limits),
        access_log=False,
        log_level=log_level,
        log_config=None,  # uvicorn's records go to the process's handler (twlb.logs)
        lifespan="auto",
        timeout_graceful_shutdown=5,
    )
