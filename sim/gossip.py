"""Gossip at scale on the simulator's kernel (`twlb.sim.kernel`): the same cores as the
live agent, in virtual time, deterministic by seed.

A `Scenario` starts N nodes of one protocol (and, for swim, one profile: this project's
or memberlist's) over a network with loss and latency, makes a fraction of them slow
(they read every message `slow_lag_s` late, Lifeguard's overloaded node), skews their
clocks if asked, kills K nodes in the round after `fail_at` (each at a random phase) and
optionally restarts them, then reads the kernel's event log through a `FailureWatch`:
time to first detection and to full agreement per failure, false positives (a death
verdict about a node that was not down) per node-hour, and messages and bytes sent per
node per second (bytes as `twlb.gossip.wire` encodes them).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from twlb.gossip.consensus import FailureWatch
from twlb.gossip.heartbeat import HeartbeatConfig, dissemination_rounds
from twlb.gossip.membership import MemberState
from twlb.gossip.nodes import GossipNode, default_config, make_node, recover_node
from twlb.gossip.swim import SwimConfig
from twlb.gossip.view import Roster
from twlb.gossip.wire import encode
from twlb.sim.kernel import Kernel
from twlb.sim.network import NetworkConfig

from twlb.protocol import ClientRequest, Effects, NodeId


@dataclass(slots=True)
class Meter:
    messages: int = 0
    bytes: int = 0


class SimMember:
    """A core as the kernel sees it: counts what it sends and, when slow, reads each
    message `lag` seconds late (its timers still fire on time, as on a busy machine
    whose event loop is behind on input)."""

    def __init__(
        self, core: GossipNode, meter: Meter, rng: random.Random, lag: tuple[float, float] | None
    ) -> None:
        self.core = core
        self.node_id = core.node_id
        self.meter = meter
        self.rng = rng
        self.lag = lag
        self._inbox: list[tuple[float, int, NodeId, Any]] = []
        self._arrivals = 0
        self._core_wake: float | None = None
        self._asked: float | None = None  # the wake-up the kernel holds for us

    def _pass(self, effects: Effects, out: Effects) -> None:
        for _, message in effects.send:
            self.meter.messages += 1
            self.meter.bytes += len(encode(message))
        out.send.extend(effects.send)
        out.events.extend(effects.events)
        if effects.wake_at is not None:
            self._core_wake = effects.wake_at

    def _wake(self, out: Effects) -> Effects:
        times = [
            t
            for t in (self._core_wake, self._inbox[0][0] if self._inbox else None)
            if t is not None
        ]
        wake = min(times) if times else None
        # the kernel keeps an alarm until it fires: asking again for the same time
        # would only leave a superseded event in its heap for every message
        out.wake_at = None if wake == self._asked else wake
        if wake is not None:
            self._asked = wake
        return out

    def start(self, now: float) -> Effects:
        out = Effects()
        self._pass(self.core.start(now), out)
        return self._wake(out)

    def on_message(self, src: NodeId, message: Any, now: float) -> Effects:
        out = Effects()
        if self.lag is None:
            self._pass(self.core.on_message(src, message, now), out)
        else:
            self._arrivals += 1
            due = now + self.rng.uniform(*self.lag)
            heapq.heappush(self._inbox, (due, self._arrivals, src, message))
        return self._wake(out)

    def on_timer(self, now: float) -> Effects:
        out = Effects()
        self._asked = None  # the alarm that woke us is spent
        while self._inbox and self._inbox[0][0] <= now:
            _, _, src, message = heapq.heappop(self._inbox)
            self._pass(self.core.on_message(src, message, now), out)
        if self._core_wake is not None and self._core_wake <= now:
            self._core_wake = None
            self._pass(self.core.on_timer(now), out)
        return self._wake(out)

    def on_request(self, request: ClientRequest, now: float) -> Effects:
        return Effects()

    def persistent_state(self) -> Mapping[str, Any]:
        return self.core.persistent_state()


class GossipAlgorithm:
    """What `Kernel.spawn` and `Network.recover_node` call to build and rebuild a node."""

    def __init__(
        self,
        protocol: str,
        config: Any,
        meter: Meter,
        slow: set[NodeId],
        lag: tuple[float, float],
        roster: Roster,
    ) -> None:
        self.protocol = protocol
        self.config = config
        self.meter = meter
        self.slow = slow
        self.lag = lag
        self.roster = roster

    def _wrap(self, core: GossipNode, rng: random.Random) -> SimMember:
        lag = self.lag if core.node_id in self.slow else None
        return SimMember(core, self.meter, rng, lag)

    def _peers(self, node_id: NodeId) -> Sequence[NodeId]:
        # SWIM shares one roster among all views; the heartbeat tables are O(N) anyway.
        if self.protocol == "swim":
            return self.roster
        return [p for p in self.roster if p != node_id]

    def __call__(self, node_id: NodeId, _peers: Any, rng: random.Random, _: Any) -> SimMember:
        config = replace(self.config, join_seeds=0)  # the run starts from a formed cluster
        core = make_node(self.protocol, node_id, self._peers(node_id), rng, config)
        return self._wrap(core, rng)

    def recover(
        self, node_id: NodeId, _peers: Any, rng: random.Random, _: Any, state: Mapping[str, Any]
    ) -> SimMember:
        """A restarted node joins through seeds, as a real one does."""
        core = recover_node(self.protocol, node_id, self._peers(node_id), rng, self.config, state)
        return self._wrap(core, rng)


@dataclass(frozen=True)
class Scenario:
    protocol: str
    nodes: int
    loss: float = 0.01
    latency_ms: tuple[float, float] = (1.0, 5.0)
    fail: int = 1
    rejoin: bool = False
    slow_fraction: float = 0.0
    slow_lag_s: tuple[float, float] = (0.2, 0.8)
    seed: int = 1
    fail_at: float = 20.0
    duration: float | None = None  # default: long enough for the slowest verdict
    overrides: tuple[tuple[str, Any], ...] = ()
    profile: str = "twlb"  # swim: "twlb" or "memberlist"
    clock_skew_s: float = 0.0  # each node's clock off by up to this, either way
    clock_drift: float = 0.0  # and running fast or slow by up to this fraction

    def config(self) -> Any:
        return default_config(self.protocol, self.profile, **dict(self.overrides))

    def verdict_bound(self) -> float:
        """An upper bound on time from failure to agreement, to size the run."""
        cfg = self.config()
        if isinstance(cfg, SwimConfig):
            worst = cfg.awareness_max_multiplier
            low, high = cfg.suspicion_window(self.nodes, worst)
            return max(low, high) + (worst + 5) * cfg.probe_interval
        assert isinstance(cfg, HeartbeatConfig)
        d = dissemination_rounds(self.protocol, self.nodes)
        return cfg.fail_after(self.protocol, self.nodes) + 3 * d * cfg.interval + 5 * cfg.interval

    def interval(self) -> float:
        cfg = self.config()
        return cfg.interval if isinstance(cfg, HeartbeatConfig) else cfg.probe_interval

    def run_length(self) -> float:
        if self.duration is not None:
            return self.duration
        end = self.fail_at + self.interval() + self.verdict_bound()
        return end + (self.verdict_bound() if self.rejoin else 0.0)


@dataclass
class RunResult:
    scenario: dict[str, Any]
    failures: list[dict[str, Any]]
    false_positives: int
    node_hours: float
    messages: int
    bytes: int
    wall_s: float
    cpu_s: float  # the process's CPU time: the fair figure on a shared machine
    sim_s: float
    events: int = 0
    interval_s: float = 0.0
    dissemination_rounds: int = 0
    fail_after_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_scenario(scn: Scenario) -> RunResult:
    cfg = scn.config()
    kernel = Kernel(seed=scn.seed, network=NetworkConfig(latency_ms=scn.latency_ms, loss=scn.loss))
    choose = random.Random(scn.seed * 7919 + scn.nodes)  # who is slow and who dies
    ids = [f"n{i:05d}" for i in range(scn.nodes)]
    slow = set(choose.sample(ids, round(scn.slow_fraction * scn.nodes)))
    meter = Meter()
    algorithm = GossipAlgorithm(scn.protocol, cfg, meter, slow, scn.slow_lag_s, Roster(ids))
    first_round = scn.interval()
    if scn.clock_skew_s or scn.clock_drift:
        for node_id in ids:
            offset = choose.uniform(-scn.clock_skew_s, scn.clock_skew_s)
            rate = 1.0 + choose.uniform(-scn.clock_drift, scn.clock_drift)
            kernel.network.set_clock_skew(node_id, offset, rate)
    for node_id in ids:
        kernel.call_at(choose.uniform(0, first_round), kernel.spawn, algorithm, node_id, (), None)
    healthy = [n for n in ids if n not in slow]
    victims = choose.sample(healthy, min(scn.fail, len(healthy) - 1))
    for victim in victims:
        # at a random phase of the first round: a kill on a round or probe-slot boundary
        # would flatter a protocol whose rounds are aligned
        kernel.call_at(
            scn.fail_at + choose.uniform(0, first_round), kernel.network.fail_node, victim
        )
    end = scn.run_length()
    if scn.rejoin:
        back = scn.fail_at + scn.interval() + scn.verdict_bound()
        for victim in victims:
            kernel.call_at(back, kernel.network.recover_node, victim)
    started, cpu = time.perf_counter(), time.process_time()
    kernel.run(until=end)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    watch = replay(ids, kernel.events, kernel.network.log)
    kinds = Counter(event[0] for _, _, event in kernel.events)  # refutations, stalls, ...
    return RunResult(
        scenario={**asdict(scn), "overrides": dict(scn.overrides), "slow": sorted(slow)},
        failures=watch.report(),
        false_positives=len(watch.false_positives),
        node_hours=scn.nodes * end / 3600.0,
        messages=meter.messages,
        bytes=meter.bytes,
        wall_s=wall,
        cpu_s=cpu,
        sim_s=end,
        events=kernel.stats.delivered + kernel.stats.timers,
        interval_s=first_round,
        dissemination_rounds=dissemination_rounds(scn.protocol, scn.nodes)
        if isinstance(cfg, HeartbeatConfig)
        else 0,
        fail_after_s=cfg.fail_after(scn.protocol, scn.nodes)
        if isinstance(cfg, HeartbeatConfig)
        else None,
        extra={"events": dict(kinds)},
    )


def replay(
    ids: Sequence[NodeId],
    events: Sequence[tuple[float, NodeId, tuple[Any, ...]]],
    faults: Sequence[tuple[float, str, Any]],
) -> FailureWatch:
    """Feed the kernel's fault log and membership events, in time order, to a watch."""
    watch = FailureWatch(ids)
    crashes = sorted(
        (t, action, node) for t, action, node in faults if action in ("crash", "recover")
    )
    i = 0
    for t, observer, event in events:
        while i < len(crashes) and crashes[i][0] <= t:
            ft, action, node = crashes[i]
            (watch.crash if action == "crash" else watch.restart)(node, ft)
            i += 1
        if event[0] == "member":
            watch.observe(observer, event[1], MemberState(event[2]), t)
    for ft, action, node in crashes[i:]:
        (watch.crash if action == "crash" else watch.restart)(node, ft)
    return watch


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (p99 of 20 samples is the largest), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(results: Sequence[RunResult]) -> dict[str, Any]:
    """One line of the report: a protocol at one N and one loss, over all runs."""
    failures = [f for r in results for f in r.failures]
    agreed = [f["agreement_s"] for f in failures if f["agreement_s"] is not None]
    detected = [f["first_detection_s"] for f in failures if f["first_detection_s"] is not None]
    suspected = [f["first_suspicion_s"] for f in failures if f["first_suspicion_s"] is not None]
    from_suspicion = [
        f["agreement_s"] - f["first_suspicion_s"]
        for f in failures
        if f["agreement_s"] is not None and f["first_suspicion_s"] is not None
    ]
    spread = [  # from the first death verdict to the last live member's
        f["agreement_s"] - f["first_detection_s"]
        for f in failures
        if f["agreement_s"] is not None and f["first_detection_s"] is not None
    ]
    readmitted = [f["readmitted_s"] for f in failures if f["readmitted_s"] is not None]
    # a death verdict before every live member suspected the node: one node's own call
    alone = [
        f
        for f in failures
        if f["first_detection_s"] is not None
        and (f["all_suspect_s"] is None or f["all_suspect_s"] > f["first_detection_s"])
    ]
    node_s = sum(r.node_hours for r in results) * 3600.0
    first = results[0]
    out = {
        "protocol": first.scenario["protocol"],
        "profile": first.scenario.get("profile", "twlb"),
        "nodes": first.scenario["nodes"],
        "loss": first.scenario["loss"],
        "slow_fraction": first.scenario["slow_fraction"],
        "slow_lag_s": list(first.scenario["slow_lag_s"]),
        "runs": len(results),
        "failures": len(failures),
        "agreed": len(agreed),
        "declared_before_all_suspected": len(alone),
        "first_suspicion_median_s": quantile(suspected, 0.5),
        "first_detection_median_s": quantile(detected, 0.5),
        "first_detection_p99_s": quantile(detected, 0.99),
        "agreement_median_s": quantile(agreed, 0.5),
        "agreement_p99_s": quantile(agreed, 0.99),
        "agreement_after_first_suspicion_p99_s": quantile(from_suspicion, 0.99),
        "agreement_after_first_verdict_p99_s": quantile(spread, 0.99),
        "readmitted_median_s": quantile(readmitted, 0.5),
        "false_positives": sum(r.false_positives for r in results),
        "runs_with_false_positives": sum(1 for r in results if r.false_positives),
        "false_positives_per_node_hour": sum(r.false_positives for r in results)
        / (node_s / 3600.0),
        "messages_per_node_s": sum(r.messages for r in results) / node_s,
        "bytes_per_node_s": sum(r.bytes for r in results) / node_s,
        "wall_s": sum(r.wall_s for r in results),
        "cpu_s": sum(r.cpu_s for r in results),
        "sim_s": sum(r.sim_s for r in results),
        "interval_s": first.interval_s,
    }
    if first.fail_after_s is not None:
        rounds = [a / first.interval_s for a in agreed]
        out["rounds_to_agreement_median"] = quantile(rounds, 0.5)
        out["dissemination_rounds"] = first.dissemination_rounds
        out["analytic_rounds_to_agreement"] = (
            first.dissemination_rounds + first.fail_after_s / first.interval_s
        )
    return out
