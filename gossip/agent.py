"""The live gossip agent: one core (`twlb.gossip.nodes`) driven over UDP by asyncio,
beside a backend's HTTP server in the same event loop.

The agent owns the socket, the clock (the loop's monotonic time) and one timer; the core
decides everything else. SWIM's probe slots are counted in wall-clock time (the core is
given the offset from the loop's clock at start), so that members on different hosts
agree on them as closely as NTP keeps their clocks (sequence-check and consensus count
their rounds the same way). Whatever a peer sends, memory and work stay bounded: datagrams
over `max_datagram` bytes or with more than `max_entries` entries are refused by the
codec, each source address may send `peer_rate` datagrams a second (a token bucket;
at most `MAX_SOURCES` sources are tracked) and all sources together `total_rate`; what
is refused is counted by reason, never processed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twlb.gossip.membership import MemberState
from twlb.gossip.nodes import GossipNode, describe, states_by_count
from twlb.gossip.wire import MAX_DATAGRAM, WireError, decode, encode

from twlb.protocol import Effects, NodeId

log = logging.getLogger("twlb.gossip")

MAX_SOURCES = 1024
MAX_RESOLVING = 64


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved (sans-IO: fed `now`)."""

    rate: float
    burst: float
    tokens: float = 0.0
    at: float | None = None

    def allow(self, now: float) -> bool:
        if self.at is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class InboundLimit:
    """Per-source and total datagram rates; the per-source table is bounded (LRU)."""

    peer_rate: float
    total_rate: float
    sources: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)
    total: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self.total = TokenBucket(self.total_rate, self.total_rate)

    def allow(self, source: str, now: float) -> bool:
        bucket = self.sources.get(source)
        if bucket is None:
            bucket = TokenBucket(self.peer_rate, 2 * self.peer_rate)
            self.sources[source] = bucket
            if len(self.sources) > MAX_SOURCES:
                self.sources.popitem(last=False)
        else:
            self.sources.move_to_end(source)
        return bucket.allow(now) and self.total.allow(now)


class GossipMetrics(Collector):
    """twlb_gossip_* metrics of one node, in the registry the node's /metrics serves."""

    def __init__(self, registry: CollectorRegistry, node_name: str) -> None:
        self.node_name = node_name
        self.agent: GossipAgent | None = None
        labels = ["node"]
        self.sent = Counter(
            "twlb_gossip_messages_sent", "Gossip datagrams sent.", labels, registry=registry
        )
        self.received = Counter(
            "twlb_gossip_messages_received",
            "Gossip datagrams received and processed.",
            labels,
            registry=registry,
        )
        self.bytes_sent = Counter(
            "twlb_gossip_sent_bytes", "Gossip bytes sent.", labels, registry=registry
        )
        self.bytes_received = Counter(
            "twlb_gossip_received_bytes",
            "Gossip bytes received (refused ones included).",
            labels,
            registry=registry,
        )
        self.dropped = Counter(
            "twlb_gossip_messages_dropped",
            "Gossip datagrams refused: rate, malformed, oversize, unresolved.",
            ["node", "reason"],
            registry=registry,
        )
        self.detections = Counter(
            "twlb_gossip_detections",
            "Membership verdicts this node reached, by new state (suspect, dead, left, alive).",
            ["node", "state"],
            registry=registry,
        )
        registry.register(self)

    def collect(self) -> Any:
        members = GaugeMetricFamily(
            "twlb_gossip_members", "Members by state in this node's view.", labels=["node", "state"]
        )
        if self.agent is not None:
            for state, count in states_by_count(self.agent.node).items():
                members.add_metric([self.node_name, state], count)
        yield members


def split_address(node: NodeId) -> tuple[str, int]:
    """ "host:port" (an IPv6 host in brackets) to (host, port); a ValueError names it."""
    host, sep, port = node.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host or " " in node:
        raise ValueError(f"gossip address must be HOST:PORT, got {node!r}")
    return host.strip("[]"), int(port)


class GossipAgent:
    """Runs `node` on a UDP socket bound to `bind`; node ids are "host:port" addresses."""

    def __init__(
        self,
        node: GossipNode,
        bind: tuple[str, int],
        *,
        metrics: GossipMetrics | None = None,
        max_datagram: int = MAX_DATAGRAM,
        max_entries: int = 512,
        peer_rate: float = 500.0,
        total_rate: float = 5000.0,
        on_event: Callable[[tuple[Any, ...]], None] | None = None,
    ) -> None:
        self.node = node
        self.bind = bind
        self.metrics = metrics
        self.max_datagram = max_datagram
        self.max_entries = max_entries
        self.limit = InboundLimit(peer_rate, total_rate)
        self.on_event = on_event
        self.transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._resolved: dict[str, tuple[str, int]] = {}
        self._resolving: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        if metrics is not None:
            metrics.agent = self

    @property
    def name(self) -> str:
        return self.metrics.node_name if self.metrics is not None else self.node.node_id

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), local_addr=self.bind
        )
        # probe slots (swim) and shared rounds (sequence-check, consensus) are counted in
        # wall-clock time, which hosts keep in step; the core is fed the loop's clock
        self.node.clock_offset = time.time() - loop.time()
        self._apply(self.node.start(loop.time()))

    async def stop(self, leave: bool = True) -> None:
        """Say goodbye (graceful leave), then close the socket."""
        if self.transport is None:
            return
        if leave and self._loop is not None:
            self._apply(self.node.leave(self._loop.time()))
            await asyncio.sleep(0)  # let the farewells go out before the socket closes
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.transport.close()
        self.transport = None

    def describe(self) -> dict[str, Any]:
        return {**describe(self.node), "address": f"{self.bind[0]}:{self.bind[1]}"}

    # -- the core's effects --------------------------------------------------------------
    def _apply(self, effects: Effects) -> None:
        for dst, message in effects.send:
            self._send(dst, message)
        if effects.wake_at is not None and self._loop is not None and self.transport is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(effects.wake_at, self._on_timer)
        for event in effects.events:
            if event[0] == "member" and event[1] != self.node.node_id:
                log.info("gossip: %s is %s (%s)", event[1], event[2], event[3])
                if self.metrics is not None:
                    self.metrics.detections.labels(self.name, event[2]).inc()
            if self.on_event is not None:
                self.on_event(event)

    def _on_timer(self) -> None:
        self._timer = None
        if self._loop is not None and self.transport is not None:
            self._apply(self.node.on_timer(self._loop.time()))

    def _send(self, dst: NodeId, message: Any) -> None:
        if self.transport is None:
            return
        data = encode(message)
        if len(data) > self.max_datagram:
            self._drop("oversize")
            return
        address = self._address(dst)
        if address is None:
            self._drop("unresolved")
            return
        self.transport.sendto(data, address)
        if self.metrics is not None:
            self.metrics.sent.labels(self.name).inc()
            self.metrics.bytes_sent.labels(self.name).inc(len(data))

    def _address(self, node: NodeId) -> tuple[str, int] | None:
        """An IP literal is used as it is; a name is resolved once in the background (the
        message that found it unresolved is lost, as UDP may lose any)."""
        cached = self._resolved.get(node)
        if cached is not None:
            return cached
        try:
            host, port = split_address(node)
        except ValueError:
            return None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if node not in self._resolving and len(self._resolving) < MAX_RESOLVING:
                self._resolving.add(node)
                task = asyncio.ensure_future(self._resolve(node, host, port))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return None
        self._resolved[node] = (host, port)
        return host, port

    async def _resolve(self, node: NodeId, host: str, port: int) -> None:
        assert self._loop is not None
        try:
            infos = await self._loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
            if infos and len(self._resolved) < 4 * MAX_SOURCES:
                self._resolved[node] = infos[0][4][:2]
        except OSError as err:
            log.info("gossip: cannot resolve %s: %s", node, err)
        finally:
            self._resolving.discard(node)

    def _drop(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.labels(self.name, reason).inc()

    # -- datagrams in ------------------------------------------------------------------
    def received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        if self.metrics is not None:
            self.metrics.bytes_received.labels(self.name).inc(len(data))
        source = f"{addr[0]}:{addr[1]}"
        if not self.limit.allow(addr[0], now):
            self._drop("rate")
            return
        try:
            message = decode(data, max_bytes=self.max_datagram, max_entries=self.max_entries)
        except WireError as err:
            log.debug("gossip: refused a datagram from %s: %s", source, err)
            self._drop("malformed" if len(data) <= self.max_datagram else "oversize")
            return
        if self.metrics is not None:
            self.metrics.received.labels(self.name).inc()
        self._apply(self.node.on_message(source, message, now))

    def states(self) -> dict[NodeId, MemberState]:
        return {n: s for n, s, _ in self.node.view()}


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, agent: GossipAgent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.agent.received(data, addr)
        except Exception:  # one bad step must not stop the node's gossip
            log.exception("gossip: failed on a datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer: the protocol's timeouts already cover it
        log.debug("gossip: socket error %s", exc)
