"""Load balancing in the simulator: the balancer's own routing policies
(`twlb.balancer.policies.make_policy`, the objects the real balancer runs) and its trust
engine, driven by the kernel in virtual time against simulated servers of different
speeds and failures.

Each server serves `workers` requests at once with exponential service times of mean
`1 / speed` times `base_service_s`; more wait in its queue. Faults during a window of
time: `crash` (connections refused), `error` (a fraction answered 5xx), `delay` (service
ten times slower). Requests arrive as a Poisson stream; each try has a timeout and a
failed try is retried once on another server, as the balancer does. The trust policy
gets the balancer's own feature windows and heuristic scorer, ticked every second; the
oracle policy gets the ground truth.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twlb.balancer.features import FleetWindows
from twlb.balancer.policies import make_policy, parse_policy_name
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine
from twlb.sim.kernel import Kernel
from twlb.sim.network import NetworkConfig
from twlb.sim.runner import percentiles

from twlb.outcome import Outcome
from twlb.spec import NodeClass, PolicyName

FAULT_KINDS = {"crash": NodeClass.CRASH, "error": NodeClass.ERROR, "delay": NodeClass.DELAY}


@dataclass(frozen=True, slots=True)
class ServerFault:
    kind: str  # crash | error | delay
    start: float
    end: float
    error_rate: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown server fault {self.kind!r}; choose one of {sorted(FAULT_KINDS)}"
            )
        if not 0 <= self.start < self.end:
            raise ValueError(f"a fault needs 0 <= start < end, got {self.start}..{self.end}")


@dataclass(slots=True)
class LbScenario:
    speeds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.4, 1.0)
    faults: dict[int, ServerFault] = field(
        default_factory=lambda: {
            5: ServerFault("error", 10.0, 50.0, 0.5),
            3: ServerFault("crash", 20.0, 35.0),
        }
    )
    rate: float = 300.0  # requests per second
    duration: float = 60.0
    base_service_s: float = 0.010
    workers: int = 4
    try_timeout: float = 0.5
    latency_ms: tuple[float, float] = (0.2, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.speeds or min(self.speeds) <= 0:
            raise ValueError("every server needs a speed > 0")
        for index in self.faults:
            if not 0 <= index < len(self.speeds):
                raise ValueError(
                    f"fault on server {index}, but servers are 0..{len(self.speeds) - 1}"
                )
        if self.rate <= 0 or self.duration <= 0:
            raise ValueError("rate and duration must be positive")


class SimServer:
    def __init__(
        self, name: str, speed: float, fault: ServerFault | None, scenario: LbScenario
    ) -> None:
        self.name = name
        self.speed = speed
        self.fault = fault
        self.scenario = scenario
        self.busy = 0
        self.queue: deque[Any] = deque()
        self.served = 0

    def fault_at(self, now: float) -> ServerFault | None:
        f = self.fault
        return f if f is not None and f.start <= now < f.end else None

    def truth(self, now: float) -> NodeClass:
        f = self.fault_at(now)
        if f is not None:
            return FAULT_KINDS[f.kind]
        return NodeClass.DELAY if self.speed < 0.5 else NodeClass.HEALTHY


class LbSimulation:
    """One policy against one scenario, in one kernel."""

    def __init__(self, policy_name: str, scenario: LbScenario) -> None:
        self.scenario = scenario
        self.policy_name = parse_policy_name(policy_name)
        self.kernel = Kernel(scenario.seed, NetworkConfig(latency_ms=scenario.latency_ms))
        self.rng = self.kernel.rng
        self.servers = {
            f"server_{i}": SimServer(f"server_{i}", speed, scenario.faults.get(i), scenario)
            for i, speed in enumerate(scenario.speeds)
        }
        names = list(self.servers)
        self.windows = FleetWindows(window_s=10.0)
        self.windows.set_backends(names)
        self.engine = TrustEngine(HeuristicScorer())
        self.engine.set_backends(names, 0.0)
        self.policy = make_policy(
            self.policy_name,
            seed=scenario.seed,
            trust_engine=self.engine if self.policy_name is PolicyName.TRUST else None,
            truth=(lambda b: self.servers[b].truth(self.kernel.now))
            if self.policy_name is PolicyName.ORACLE
            else None,
        )
        self.policy.set_backends(names, 0.0)
        self.latencies: list[float] = []
        self.failures = 0
        self.requests = 0
        self.tries_to_faulty = 0
        self.tries = 0

    def run(self) -> dict[str, Any]:
        k = self.kernel
        k.call_at(self._next_gap(), self._arrive)
        k.call_at(0.1, self._policy_tick)
        k.call_at(1.0, self._trust_tick)
        k.run(until=self.scenario.duration, max_events=50_000_000)
        return self.report()

    def _next_gap(self) -> float:
        return self.kernel.now - math.log(1.0 - self.rng.random()) / self.scenario.rate

    def _arrive(self) -> None:
        self.requests += 1
        self._try(self.kernel.now, tried=())
        self.kernel.call_at(self._next_gap(), self._arrive)

    def _try(self, started: float, tried: tuple[str, ...]) -> None:
        now = self.kernel.now
        candidates = [b for b in self.servers if b not in tried]
        backend = self.policy.pick(candidates, now, key=f"k{self.requests % 1000}")
        if backend is None:
            self._finish(started, ok=False)
            return
        self.tries += 1
        self.tries_to_faulty += self.servers[backend].truth(now) is not NodeClass.HEALTHY
        self.policy.on_start(backend, now)
        attempt = {
            "done": False,
            "backend": backend,
            "sent": now,
            "started": started,
            "tried": (*tried, backend),
        }
        self.kernel.call_after(self.kernel.network.client_latency(), self._reach, attempt)
        self.kernel.call_after(self.scenario.try_timeout, self._end_try, attempt, Outcome.TIMEOUT)

    def _reach(self, attempt: dict) -> None:
        server = self.servers[attempt["backend"]]
        fault = server.fault_at(self.kernel.now)
        if fault is not None and fault.kind == "crash":
            self.kernel.call_after(
                self.kernel.network.client_latency(), self._end_try, attempt, Outcome.CONNECT_ERROR
            )
            return
        if server.busy < self.scenario.workers:
            self._serve(server, attempt)
        else:
            server.queue.append(attempt)

    def _serve(self, server: SimServer, attempt: dict) -> None:
        server.busy += 1
        fault = server.fault_at(self.kernel.now)
        mean = (
            self.scenario.base_service_s
            / server.speed
            * (10.0 if fault and fault.kind == "delay" else 1.0)
        )
        service = -math.log(1.0 - self.rng.random()) * mean
        outcome = Outcome.SUCCESS
        if fault is not None and fault.kind == "error" and self.rng.random() < fault.error_rate:
            outcome = Outcome.ERROR
        self.kernel.call_after(service, self._served, server, attempt, outcome)

    def _served(self, server: SimServer, attempt: dict, outcome: Outcome) -> None:
        server.busy -= 1
        server.served += 1
        if server.queue:
            self._serve(server, server.queue.popleft())
        self.kernel.call_after(
            self.kernel.network.client_latency(), self._end_try, attempt, outcome
        )

    def _end_try(self, attempt: dict, outcome: Outcome) -> None:
        if attempt["done"]:
            return  # the timeout already settled it, or the answer came after the timeout
        attempt["done"] = True
        now = self.kernel.now
        latency = now - attempt["sent"]
        backend = attempt["backend"]
        self.policy.on_end(backend, now, outcome, latency)
        self.windows[backend].record_request(now, outcome, latency)
        if outcome is Outcome.SUCCESS:
            self._finish(attempt["started"], ok=True)
        elif len(attempt["tried"]) < 2:
            self._try(attempt["started"], attempt["tried"])
        else:
            self._finish(attempt["started"], ok=False)

    def _finish(self, started: float, ok: bool) -> None:
        if ok:
            self.latencies.append(self.kernel.now - started)
        else:
            self.failures += 1

    def _policy_tick(self) -> None:
        self.policy.tick(self.kernel.now)
        self.kernel.call_after(0.1, self._policy_tick)

    def _trust_tick(self) -> None:
        now = self.kernel.now
        features = self.windows.features(now)
        if features:
            self.engine.update(features, now)
        self.kernel.call_after(1.0, self._trust_tick)

    def report(self) -> dict[str, Any]:
        done = len(self.latencies) + self.failures
        return {
            "policy": self.policy_name.value,
            "requests": done,
            "success_ratio": round(len(self.latencies) / done, 5) if done else None,
            "latency_ms": percentiles(self.latencies),
            "mean_latency_ms": round(1000 * sum(self.latencies) / len(self.latencies), 3)
            if self.latencies
            else None,
            "tries_to_unhealthy_ratio": round(self.tries_to_faulty / self.tries, 5)
            if self.tries
            else None,
            "served_per_server": {name: s.served for name, s in self.servers.items()},
        }


def compare(policies: list[str], scenario: LbScenario) -> list[dict[str, Any]]:
    return [LbSimulation(name, scenario).run() for name in policies]


__all__ = ["LbScenario", "LbSimulation", "ServerFault", "compare", "FAULT_KINDS"]
