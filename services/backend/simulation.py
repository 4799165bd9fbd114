"""Sans-IO node simulation: one node's load, latency, packet loss, CPU and memory over time.

Everything derives from the node's seed. `conditions(now)` (load, CPU, memory, network
latency) is a pure function of the seed and the time since `start`, so reading it for a
metrics scrape never disturbs the request stream; `sample(now)` draws one request's
latency and packet loss from the node's own RNG, so the same seed and the same sequence
of `now` values give the same sequence of samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

MIB = 1024 * 1024

#: Traffic spikes are drawn per window of this length (at most one spike starts in each).
SPIKE_WINDOW_S = 20.0
#: A spike lasts at most this long, so only the current and previous windows can overlap `now`.
SPIKE_MAX_S = 8.0
#: Per-request loss scales with load, but never beyond this multiple of the node's base loss.
LOSS_LOAD_CAP = 2.0


@dataclass(frozen=True, slots=True)
class NodeProfile:
    """A node's fixed characteristics, drawn once from its seed."""

    base_latency_s: float  # service time at load 1.0
    network_latency_s: float  # fixed network round-trip share
    jitter_ratio: float  # Gaussian jitter sigma, relative to the mean latency
    packet_loss: float  # per-request drop chance at load 1.0
    load_period_s: float  # period of the sinusoidal load
    load_amplitude: float  # relative amplitude of the sinusoid
    load_phase: float  # radians
    spike_chance: float  # chance that a spike starts in a given spike window
    cpu_idle_ratio: float  # CPU used at zero load
    cpu_per_load: float  # CPU used per unit of load
    memory_base_bytes: int
    memory_per_load_bytes: int
    heap_growth_bytes: int  # garbage that builds up between collections
    gc_period_s: float  # a collection every this many seconds frees the garbage

    @classmethod
    def from_seed(cls, seed: int) -> NodeProfile:
        rng = random.Random(f"twlb-node-profile:{seed}")
        return cls(
            base_latency_s=rng.uniform(0.5e-3, 2.0e-3),
            network_latency_s=rng.uniform(0.2e-3, 0.6e-3),
            jitter_ratio=rng.uniform(0.08, 0.25),
            packet_loss=rng.uniform(0.0005, 0.003),
            load_period_s=rng.uniform(30.0, 120.0),
            load_amplitude=rng.uniform(0.15, 0.45),
            load_phase=rng.uniform(0.0, 2.0 * math.pi),
            spike_chance=rng.uniform(0.2, 0.6),
            cpu_idle_ratio=rng.uniform(0.02, 0.08),
            cpu_per_load=rng.uniform(0.15, 0.30),
            memory_base_bytes=int(rng.uniform(80, 200) * MIB),
            memory_per_load_bytes=int(rng.uniform(8, 32) * MIB),
            heap_growth_bytes=int(rng.uniform(4, 24) * MIB),
            gc_period_s=rng.uniform(60.0, 300.0),
        )


@dataclass(frozen=True, slots=True)
class Spike:
    """A burst of extra traffic: rises and falls as half a sine wave over `duration_s`."""

    start_s: float
    duration_s: float
    extra_load: float

    def load_at(self, t: float) -> float:
        x = (t - self.start_s) / self.duration_s
        if 0.0 <= x <= 1.0:
            return self.extra_load * math.sin(math.pi * x)
        return 0.0


@dataclass(frozen=True, slots=True)
class NodeConditions:
    """The node's simulated state at one moment."""

    load: float  # 1.0 is the node's normal traffic
    cpu_utilization: float  # 0..1
    memory_bytes: int
    network_latency_s: float


class RequestSample(NamedTuple):
    """What the simulated node and network do to one request (a tuple: built per request)."""

    latency_s: float  # added before the answer leaves
    dropped: bool  # the connection is lost instead of answered


class NodeSimulation:
    """A node's simulated resources and network, driven by explicit `now` values.

    With `enabled=False` the node adds no latency and reports no simulated conditions;
    a `packet_loss` override (0..1) replaces the load-dependent loss either way.
    """

    def __init__(
        self,
        seed: int,
        start: float,
        *,
        enabled: bool = True,
        packet_loss: float | None = None,
    ) -> None:
        if packet_loss is not None and not 0.0 <= packet_loss <= 1.0:
            raise ValueError(f"packet_loss must be in 0..1, got {packet_loss}")
        self.seed = seed
        self.start = start
        self.enabled = enabled
        self.packet_loss = packet_loss
        self.profile = NodeProfile.from_seed(seed)
        self._rng = random.Random(f"twlb-node-requests:{seed}")
        self._spikes: dict[int, Spike | None] = {}
        # The spikes that can overlap the current spike window (see `draw`).
        self._window: int | None = None
        self._window_spikes: tuple[Spike, ...] = ()

    def _spike(self, window: int) -> Spike | None:
        if window not in self._spikes:
            if len(self._spikes) > 8:
                self._spikes.clear()
            rng = random.Random(f"twlb-node-spikes:{self.seed}:{window}")
            spike = None
            if rng.random() < self.profile.spike_chance:
                spike = Spike(
                    start_s=(window + rng.random()) * SPIKE_WINDOW_S,
                    duration_s=rng.uniform(2.0, SPIKE_MAX_S),
                    extra_load=rng.uniform(0.5, 2.0),
                )
            self._spikes[window] = spike
        return self._spikes[window]

    def load(self, now: float) -> float:
        """Traffic relative to normal at `now`: a sinusoid plus any spike in progress."""
        p = self.profile
        t = now - self.start
        wave = 1.0 + p.load_amplitude * math.sin(2.0 * math.pi * t / p.load_period_s + p.load_phase)
        window = math.floor(t / SPIKE_WINDOW_S)
        extra = 0.0
        for w in (window - 1, window):
            spike = self._spike(w)
            if spike is not None:
                extra += spike.load_at(t)
        return max(0.0, wave + extra)

    def conditions(self, now: float) -> NodeConditions:
        """The node's load, CPU, memory and network latency at `now` (no RNG draw)."""
        p = self.profile
        load = self.load(now)
        heap = p.heap_growth_bytes * (((now - self.start) % p.gc_period_s) / p.gc_period_s)
        return NodeConditions(
            load=load,
            cpu_utilization=min(1.0, p.cpu_idle_ratio + p.cpu_per_load * load),
            memory_bytes=int(p.memory_base_bytes + p.memory_per_load_bytes * load + heap),
            network_latency_s=p.network_latency_s,
        )

    def sample(self, now: float) -> RequestSample:
        """One request arriving at `now`: its added latency and whether it is dropped."""
        return RequestSample(*self.draw(now))

    def draw(self, now: float) -> tuple[float, bool]:
        """`sample(now)` as a plain tuple: the same draws, without building a named tuple.

        The service calls this once per request, so it inlines `load` over the spikes of
        the current window pair, which it keeps until `now` leaves that window.
        """
        rng = self._rng
        if not self.enabled:
            loss = self.packet_loss or 0.0
            return 0.0, loss > 0.0 and rng.random() < loss
        p = self.profile
        t = now - self.start
        wave = 1.0 + p.load_amplitude * math.sin(2.0 * math.pi * t / p.load_period_s + p.load_phase)
        window = math.floor(t / SPIKE_WINDOW_S)
        if window != self._window:
            self._window = window
            self._window_spikes = tuple(
                s for s in (self._spike(window - 1), self._spike(window)) if s is not None
            )
        extra = 0.0  # summed apart from the wave, exactly as `load` does
        for spike in self._window_spikes:
            extra += spike.load_at(t)
        load = wave + extra
        if load < 0.0:
            load = 0.0
        mean = p.network_latency_s + p.base_latency_s * load
        latency = rng.gauss(mean, p.jitter_ratio * mean)
        if latency < 0.1 * mean:
            latency = 0.1 * mean
        if self.packet_loss is None:
            loss = p.packet_loss * (load if load < LOSS_LOAD_CAP else LOSS_LOAD_CAP)
        else:
            loss = self.packet_loss
        return latency, rng.random() < loss
