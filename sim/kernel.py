"""The simulator's deterministic discrete-event kernel: virtual time, one seeded random
source and a heap of timed events, driving any sans-IO node of `twlb.protocol`.

Why a hand-written heap and not simpy, measured by `bench/sim_kernel_bench.py` (the same
message-forwarding workload, per CPU-second, one run): a bare heapq loop does 977,000
deliveries against 551,000 for simpy's cheapest form (timeouts with callbacks) and
88,000 for its idiomatic one (a process per node with a Store inbox); this whole kernel,
network model and statistics included, does 363,000 where simpy driving the same node
objects with no network model at all does 388,000. A simpy step pays for an Event
object and callback dispatch, and nothing here needs simpy's resources or process
composition: a node is a state machine that is called, not a coroutine that waits.

Virtual time is in seconds (floats). Every random draw (latency, loss, duplication,
the nodes' own timeouts) comes from `kernel.rng`, one `random.Random(seed)`, and ties in
time are broken by a sequence number, so the same seed gives the same run, event for
event (`trace=True` records it).

Example::

    from twlb.sim.kernel import Kernel
    from twlb.sim.network import NetworkConfig

    kernel = Kernel(seed=7, network=NetworkConfig(latency_ms=(10, 100), loss=0.01))
    ids = ["node_0", "node_1", "node_2"]
    for node_id in ids:
        kernel.spawn(Raft, node_id, [p for p in ids if p != node_id], config={})
    kernel.call_at(5.0, kernel.network.fail_node, "node_1")        # crash-recover
    kernel.call_at(9.0, kernel.network.recover_node, "node_1")     # Raft.recover(...)
    kernel.network.create_partition({"node_0"}, {"node_2"})
    kernel.run(until=30.0)
    kernel.stats, kernel.events      # message counts; (time, node, protocol event)

Nodes follow `ProtocolNode`: the kernel calls `start(now)` once (and again after
`recover`), `on_message(src, msg, now)` per delivered message, `on_timer(now)` at the
last `Effects.wake_at` asked (an alarm that fired is cleared), and `on_request(req,
now)` for client operations sent with `send_request`. `Effects.send` goes through the
network model (`twlb.sim.network`), `Effects.replies` travel back to the client that
registered with `register_client`, and `Effects.events` are appended to
`kernel.events` as `(time, node_id, event)` for the checkers and the timeline (and
handed to `kernel.watchers`, so a nemesis can strike in the instant after an event). A node's
`now` is its own clock: `network.set_clock_skew` shifts it, and its `wake_at` is read
on that clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twlb.sim.network import Network, NetworkConfig

from twlb.protocol import ClientReply, ClientRequest, Effects, NodeId, ProtocolNode

# Event kinds in the heap: (time, seq, kind, a, b, c).
DELIVER, TIMER, REQUEST, REPLY, CALL = range(5)
KIND_NAMES = ("deliver", "timer", "request", "reply", "call")


@dataclass(slots=True)
class Stats:
    """Message counts of one run (client requests and replies are counted apart)."""

    sent: int = 0
    delivered: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_down: int = 0
    duplicated: int = 0
    timers: int = 0
    requests: int = 0
    replies: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_loss + self.dropped_partition + self.dropped_down

    def as_dict(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "dropped_loss": self.dropped_loss,
            "dropped_partition": self.dropped_partition,
            "dropped_down": self.dropped_down,
            "duplicated": self.duplicated,
            "timers": self.timers,
            "client_requests": self.requests,
            "client_replies": self.replies,
        }


@dataclass(frozen=True, slots=True)
class Spawned:
    """How a node was built, so a crashed node can be rebuilt by `Algorithm.recover`."""

    algorithm: Any
    peers: tuple[NodeId, ...]
    config: Mapping[str, Any]


ReplyHandler = Callable[[ClientReply, NodeId, float], None]


class Kernel:
    """Runs nodes, clients and scheduled calls in virtual time, deterministically."""

    def __init__(
        self, seed: int = 0, network: NetworkConfig | None = None, *, trace: bool = False
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.stats = Stats()
        self.nodes: dict[NodeId, ProtocolNode] = {}  # the nodes that are up
        self.spawned: dict[NodeId, Spawned] = {}
        self.events: list[tuple[float, NodeId, tuple[Any, ...]]] = []
        self.trace: list[tuple[Any, ...]] | None = [] if trace else None
        self._queue: list[tuple[Any, ...]] = []
        self._next_seq = itertools.count().__next__
        self._alarm: dict[NodeId, int] = {}  # node -> seq of its live TIMER event
        self._clients: dict[str, ReplyHandler] = {}
        # Called as watch(node_id, events) right after a step that emitted events, before
        # anything else happens: a nemesis reacts to a protocol event in that instant.
        self.watchers: list[Callable[[NodeId, list[tuple[Any, ...]]], None]] = []
        self.network = Network(self, network or NetworkConfig())

    # -- building the world -------------------------------------------------------
    def spawn(
        self,
        algorithm: Any,
        node_id: NodeId,
        peers: Sequence[NodeId],
        config: Mapping[str, Any] | None = None,
    ) -> ProtocolNode:
        """Build `algorithm(node_id, peers, rng, config)`, add it and start it now."""
        config = dict(config or {})
        node = algorithm(node_id, list(peers), self.rng, config)
        self.add_node(node, algorithm=algorithm, peers=peers, config=config)
        return node

    def add_node(
        self,
        node: ProtocolNode,
        *,
        algorithm: Any = None,
        peers: Sequence[NodeId] = (),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a node built elsewhere (a Byzantine variant, say) and start it now.
        With `algorithm` given it can crash and recover; without, only crash-stop."""
        node_id = node.node_id
        if node_id in self.nodes or node_id in self.network.down:
            raise ValueError(f"node {node_id!r} already exists")
        self.nodes[node_id] = node
        if algorithm is not None:
            self.spawned[node_id] = Spawned(algorithm, tuple(peers), dict(config or {}))
        self._apply(node_id, node.start(self.network.local_time(node_id, self.now)))

    def register_client(self, client: str, on_reply: ReplyHandler) -> None:
        """Replies addressed to `client` are handed to `on_reply(reply, node_id, now)`."""
        self._clients[client] = on_reply

    # -- scheduling ---------------------------------------------------------------
    def _push(self, at: float, kind: int, a: Any, b: Any, c: Any) -> int:
        seq = self._next_seq()
        heapq.heappush(self._queue, (at, seq, kind, a, b, c))
        return seq

    def call_at(self, at: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` at virtual time `at` (a fault, a client's next operation)."""
        self._push(max(at, self.now), CALL, fn, args, None)

    def call_after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.call_at(self.now + delay, fn, *args)

    def send_request(self, client: str, node_id: NodeId, request: ClientRequest) -> None:
        """A client sends an operation to a node; it is lost if the node is down when
        it arrives (the client's timeout then decides)."""
        self.stats.requests += 1
        self._push(self.now + self.network.client_latency(), REQUEST, client, node_id, request)

    # -- effects ------------------------------------------------------------------
    def _apply(self, node_id: NodeId, effects: Effects) -> None:
        if effects.send:
            transmit = self.network.transmit
            for dst, message in effects.send:
                transmit(node_id, dst, message)
        if effects.replies:
            latency = self.network.client_latency
            for reply in effects.replies:
                self._push(self.now + latency(), REPLY, node_id, reply.client, reply)
        if effects.wake_at is not None:
            at = self.network.global_time(node_id, effects.wake_at)
            self._alarm[node_id] = self._push(
                at if at > self.now else self.now, TIMER, node_id, None, None
            )
        if effects.events:
            now = self.now
            self.events.extend((now, node_id, event) for event in effects.events)
            if self.watchers:
                for watch in tuple(self.watchers):
                    watch(node_id, effects.events)

    def cancel_alarm(self, node_id: NodeId) -> None:
        self._alarm.pop(node_id, None)

    # -- the loop -----------------------------------------------------------------
    def run(self, until: float, max_events: int | None = None) -> int:
        """Process every event up to virtual time `until` (inclusive); return how many.
        `max_events` bounds the work whatever the nodes do."""
        queue = self._queue
        pop = heapq.heappop
        nodes = self.nodes
        network = self.network
        stats = self.stats
        alarm = self._alarm
        trace = self.trace
        apply = self._apply
        skew = network.skew
        blocked = network.blocked  # mutated in place by the network, never rebound
        local = network.local_time
        budget = -1 if max_events is None else max_events
        done = 0
        while queue and queue[0][0] <= until and done != budget:
            event = pop(queue)
            at, _seq, kind, a, b, c = event
            self.now = at
            done += 1
            if network.paused and kind != CALL:  # rare: only while a pause is in force
                target = b if kind in (DELIVER, REQUEST) else a
                if kind != REPLY and network.paused.get(target, 0.0) > at:
                    # A paused process handles nothing; its inbox and timers wait.
                    self._requeue(network.paused[target], event)
                    continue
            if kind == DELIVER:
                node = nodes.get(b)
                if node is None:
                    stats.dropped_down += 1
                    continue
                if blocked and (a, b) in blocked:
                    stats.dropped_partition += 1
                    continue
                stats.delivered += 1
                if trace is not None:
                    trace.append((at, "deliver", a, b, c))
                apply(b, node.on_message(a, c, local(b, at) if skew else at))
            elif kind == TIMER:
                if alarm.get(a) != _seq:
                    continue  # superseded by a later wake_at, or the node crashed
                del alarm[a]
                stats.timers += 1
                if trace is not None:
                    trace.append((at, "timer", a))
                apply(a, nodes[a].on_timer(local(a, at) if skew else at))
            elif kind == REQUEST:
                node = nodes.get(b)
                if node is None:
                    continue
                if trace is not None:
                    trace.append((at, "request", a, b, c))
                apply(b, node.on_request(c, local(b, at) if skew else at))
            elif kind == REPLY:
                stats.replies += 1
                handler = self._clients.get(b)
                if trace is not None:
                    trace.append((at, "reply", a, b, c))
                if handler is not None:
                    handler(c, a, at)
            else:
                a(*b)
        if until > self.now and until != float("inf"):
            self.now = until
        return done

    def _requeue(self, at: float, event: tuple[Any, ...]) -> None:
        _at, seq, kind, a, b, c = event
        new_seq = self._push(at, kind, a, b, c)
        if kind == TIMER and self._alarm.get(a) == seq:
            self._alarm[a] = new_seq

    def pending(self) -> int:
        return len(self._queue)


__all__ = ["Kernel", "Stats", "Spawned", "KIND_NAMES"]
