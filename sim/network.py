"""The simulated network and the faults it can inject, for `twlb.sim.kernel`.

Messages take a latency drawn uniformly from LOW..HIGH milliseconds and, by default,
arrive in order per link (as over TCP). Faults, each settable at any virtual time:
- `loss` (probability a message is dropped), `duplicate` (probability it is delivered
  twice), `reorder` (probability it may overtake earlier messages on its link);
- `create_partition(set_a, set_b)` cuts every link between the two sets, both ways,
  including messages already in flight; `isolate(node)`; `heal()` mends every cut;
- `fail_node(node)` crashes a node: it loses its memory and its timers, and what
  `persistent_state()` returned at the crash is kept; `recover_node(node)` rebuilds it
  with `Algorithm.recover(node_id, peers, rng, config, state)` and starts it.
  `fail_node(node, crash_stop=True)` is a crash with no recovery;
- `pause_node(node, seconds)`: a stalled process (GC pause, SIGSTOP): it handles
  nothing, its messages and timers wait, then all arrive at once;
- `set_clock_skew(node, offset, rate)`: the node's clock reads `offset + rate * t`.
Every fault is written to `network.log` as `(time, action, detail)`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from heapq import heappush
from random import Random
from typing import Any, Protocol

from twlb.protocol import Effects, NodeId


class Kernel(Protocol):
    """The kernel as its network sees it (`twlb.sim.kernel.Kernel` owns one `Network`):
    declared here so that the network needs no import of the kernel that imports it."""

    rng: Random
    now: float
    stats: Any
    trace: list[tuple[Any, ...]] | None
    nodes: dict[NodeId, Any]
    spawned: dict[NodeId, Any]
    _queue: list[tuple[Any, ...]]

    def _next_seq(self) -> int: ...

    def _push(self, at: float, kind: int, a: Any, b: Any, c: Any) -> int: ...

    def _apply(self, node_id: NodeId, effects: Effects) -> None: ...

    def cancel_alarm(self, node_id: NodeId) -> None: ...


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The network's behaviour when no fault is active (faults can change it later)."""

    latency_ms: tuple[float, float] = (10.0, 100.0)
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.latency_ms
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            raise ValueError(f"latency must be 0 <= LOW <= HIGH ms, got {low}..{high}")
        for name in ("loss", "duplicate", "reorder"):
            check_probability(name, getattr(self, name))


def check_probability(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in 0..1, got {value!r}")
    return float(value)


class Network:
    """Links between nodes, and the faults on them; owned by one `Kernel`."""

    def __init__(self, kernel: Kernel, config: NetworkConfig) -> None:
        self.kernel = kernel
        self.config = config
        self._random = kernel.rng.random
        self.log: list[tuple[float, str, Any]] = []
        self._low = config.latency_ms[0] / 1000.0
        self._span = (config.latency_ms[1] - config.latency_ms[0]) / 1000.0
        self.loss = config.loss
        self.duplicate = config.duplicate
        self.reorder = config.reorder
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.partitions: list[tuple[frozenset[NodeId], frozenset[NodeId]]] = []
        self.down: dict[NodeId, Mapping[str, Any] | None] = {}  # None: crash-stopped
        self.paused: dict[NodeId, float] = {}  # node -> virtual time it resumes
        self.skew: dict[NodeId, tuple[float, float]] = {}
        self._last_arrival: dict[tuple[NodeId, NodeId], float] = {}

    # -- the message path (hot) ---------------------------------------------------
    def transmit(self, src: NodeId, dst: NodeId, message: Any) -> None:
        kernel = self.kernel
        stats = kernel.stats
        stats.sent += 1
        now = kernel.now
        if kernel.trace is not None:
            kernel.trace.append((now, "send", src, dst, message))
        link = (src, dst)
        if self.blocked and link in self.blocked:
            stats.dropped_partition += 1
            return
        random = self._random
        if self.loss and random() < self.loss:
            stats.dropped_loss += 1
            return
        at = now + self._low + self._span * random()
        if not self.reorder or random() >= self.reorder:
            last = self._last_arrival.get(link, 0.0)
            if at < last:
                at = last
            self._last_arrival[link] = at
        heappush(kernel._queue, (at, kernel._next_seq(), 0, src, dst, message))  # 0: DELIVER
        if self.duplicate and random() < self.duplicate:
            stats.duplicated += 1
            kernel._push(now + self._low + self._span * random(), 0, src, dst, message)

    def client_latency(self) -> float:
        return self._low + self._span * self.kernel.rng.random()

    def local_time(self, node_id: NodeId, t: float) -> float:
        if self.skew:
            skew = self.skew.get(node_id)
            if skew is not None:
                return skew[0] + skew[1] * t
        return t

    def global_time(self, node_id: NodeId, local: float) -> float:
        """The true time at which `node_id`'s clock reads `local`: never earlier, so a
        node woken for `local` sees at least `local` on its clock. (Rounding can land the
        plain inverse a hair early; a node that then asks for the same time again would
        be woken at the same instant forever.)"""
        if self.skew:
            skew = self.skew.get(node_id)
            if skew is not None:
                offset, rate = skew
                true = (local - offset) / rate
                while offset + rate * true < local:
                    true = math.nextafter(true, math.inf)
                return true
        return local

    # -- link faults --------------------------------------------------------------
    def set_latency(self, low_ms: float, high_ms: float) -> None:
        NetworkConfig(latency_ms=(low_ms, high_ms))  # validates
        self._low = low_ms / 1000.0
        self._span = (high_ms - low_ms) / 1000.0
        self._record("latency", (low_ms, high_ms))

    def set_loss(self, probability: float) -> None:
        self.loss = check_probability("loss", probability)
        self._record("loss", self.loss)

    def set_duplicate(self, probability: float) -> None:
        self.duplicate = check_probability("duplicate", probability)
        self._record("duplicate", self.duplicate)

    def set_reorder(self, probability: float) -> None:
        self.reorder = check_probability("reorder", probability)
        self._record("reorder", self.reorder)

    def create_partition(self, set_a: Iterable[NodeId], set_b: Iterable[NodeId]) -> None:
        a, b = frozenset(set_a), frozenset(set_b)
        if not a or not b or a & b:
            raise ValueError(
                f"a partition needs two disjoint non-empty sets, got {set(a)} and {set(b)}"
            )
        for x in a:
            for y in b:
                self.blocked.add((x, y))
                self.blocked.add((y, x))
        self.partitions.append((a, b))
        self._record("partition", (sorted(a), sorted(b)))

    def isolate(self, node_id: NodeId) -> None:
        others = (set(self.kernel.nodes) | set(self.down) | set(self.kernel.spawned)) - {node_id}
        self.create_partition({node_id}, others)

    def heal(self) -> None:
        self.blocked.clear()
        self.partitions.clear()
        self._record("heal", None)

    # -- node faults --------------------------------------------------------------
    def fail_node(self, node_id: NodeId, *, crash_stop: bool = False) -> None:
        kernel = self.kernel
        node = kernel.nodes.pop(node_id, None)
        if node is None:
            raise ValueError(f"cannot fail {node_id!r}: it is not a running node")
        recoverable = not crash_stop and node_id in kernel.spawned
        # Deep-copied so that nothing the dead process held in memory leaks into its
        # successor: only what it had persisted survives.
        self.down[node_id] = copy.deepcopy(dict(node.persistent_state())) if recoverable else None
        kernel.cancel_alarm(node_id)
        self.paused.pop(node_id, None)
        self._record("crash-stop" if not recoverable else "crash", node_id)

    def recover_node(self, node_id: NodeId) -> None:
        kernel = self.kernel
        if node_id not in self.down:
            raise ValueError(f"cannot recover {node_id!r}: it is not down")
        state = self.down[node_id]
        if state is None:
            raise ValueError(f"cannot recover {node_id!r}: it was crash-stopped")
        del self.down[node_id]
        spawned = kernel.spawned[node_id]
        node = spawned.algorithm.recover(
            node_id, list(spawned.peers), kernel.rng, dict(spawned.config), state
        )
        kernel.nodes[node_id] = node
        self._record("recover", node_id)
        kernel._apply(node_id, node.start(self.local_time(node_id, kernel.now)))

    def pause_node(self, node_id: NodeId, seconds: float) -> None:
        if node_id not in self.kernel.nodes:
            raise ValueError(f"cannot pause {node_id!r}: it is not a running node")
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"pause must last a finite, non-negative time, got {seconds}")
        self.paused[node_id] = max(self.paused.get(node_id, 0.0), self.kernel.now + seconds)
        self._record("pause", (node_id, seconds))

    def set_clock_skew(self, node_id: NodeId, offset: float = 0.0, rate: float = 1.0) -> None:
        if not (rate > 0 and math.isfinite(rate) and math.isfinite(offset)):
            raise ValueError(
                f"clock skew needs a finite offset and a rate > 0, got {offset}, {rate}"
            )
        if offset == 0.0 and rate == 1.0:
            self.skew.pop(node_id, None)
        else:
            self.skew[node_id] = (offset, rate)
        self._record("skew", (node_id, offset, rate))

    def is_up(self, node_id: NodeId) -> bool:
        return node_id in self.kernel.nodes

    def _record(self, action: str, detail: Any) -> None:
        self.log.append((self.kernel.now, action, detail))


__all__ = ["Network", "NetworkConfig", "check_probability"]
