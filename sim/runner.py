"""One checked simulation: a cluster of protocol nodes, clients, a fault schedule, and
the verdicts of every checker afterwards.

    from twlb.sim.runner import SimConfig, Simulation

    sim = Simulation(SimConfig(algorithm="raft", nodes=5, seed=3, duration=30))
    sim.run_until(5)
    sim.network.fail_node("node_1")
    sim.network.create_partition({"node_0", "node_2"}, {"node_3", "node_4"})
    sim.run_until(15)
    sim.network.heal()
    sim.network.recover_node("node_1")
    report = sim.finish()          # runs to `duration`, then checks
    report["checks"]               # linearizability, invariants, progress

Checks after every run: the client history is linearizable (`twlb.sim.checker`, kv
model, per key); the protocol's own invariants (`twlb.sim.invariants.check_invariants`);
and progress: once every fault has healed, some operation completes within
`progress_within` seconds.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from twlb.sim.checker import SearchBudgetExceeded, check_history
from twlb.sim.history import History, ProcessNumbers, SimClient, Workload
from twlb.sim.kernel import Kernel
from twlb.sim.nemesis import TARGETED, Arena, start_episode
from twlb.sim.network import Network, NetworkConfig

from twlb.protocol import bft_faults, quorum

#: The --algorithm names; their classes come from `twlb.sim.algorithms.ALGORITHMS`.
ALGORITHMS: tuple[str, ...] = ("raft", "paxos", "pbft")

#: Protocol events that mark a new leader or view, for counts and the timeline.
LEADERSHIP_EVENTS = frozenset(
    {"leader", "elected", "became_leader", "view", "new_view", "view_change"}
)


def load_algorithm(name: str) -> Any:
    from twlb.sim.algorithms import ALGORITHMS as AVAILABLE

    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    if name not in AVAILABLE:
        raise ValueError(f"algorithm {name!r} is not available in this build")
    return AVAILABLE[name]


#: Plain fault actions (fixed targets); the aiming ones are `twlb.sim.nemesis.TARGETED`.
ACTIONS = frozenset(
    {
        "partition",
        "cut",
        "heal",
        "crash",
        "crash-stop",
        "recover",
        "pause",
        "loss",
        "duplicate",
        "reorder",
        "skew",
    }
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault: at virtual time `at`, `action` with `args` on the network.

    Plain actions: partition [SIDE_A, SIDE_B]; cut [[A, B], ...] (single links, both
    ways); heal; crash, crash-stop, recover [NODE]; pause [NODE, SECONDS]; loss,
    duplicate, reorder [PROBABILITY]; skew [NODE, OFFSET, RATE]. An aiming episode of
    `twlb.sim.nemesis` is `[at, NAME, [UNTIL, SEED]]`: it picks its targets as the run
    goes."""

    at: float
    action: str
    args: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ACTIONS and self.action not in TARGETED:
            known = ", ".join(sorted(ACTIONS | set(TARGETED)))
            raise ValueError(f"unknown fault action {self.action!r}; known: {known}")
        if self.aims and not (
            len(self.args) == 2
            and isinstance(self.args[0], int | float)
            and isinstance(self.args[1], int)
            and self.args[0] > self.at
        ):
            raise ValueError(
                f"{self.action} at {self.at:g}: expected [UNTIL, SEED] with UNTIL after the "
                f"start and SEED an integer, got {list(self.args)}"
            )

    @property
    def aims(self) -> bool:
        return self.action in TARGETED

    def apply(self, network: Network) -> None:
        a = self.args
        if self.action == "partition":
            network.create_partition(set(a[0]), set(a[1]))
        elif self.action == "cut":
            for x, y in a:
                network.create_partition({x}, {y})
        elif self.action == "heal":
            network.heal()
        elif self.action == "crash":
            network.fail_node(a[0])
        elif self.action == "crash-stop":
            network.fail_node(a[0], crash_stop=True)
        elif self.action == "recover":
            network.recover_node(a[0])
        elif self.action == "pause":
            network.pause_node(a[0], a[1])
        elif self.action == "loss":
            network.set_loss(a[0])
        elif self.action == "duplicate":
            network.set_duplicate(a[0])
        elif self.action == "reorder":
            network.set_reorder(a[0])
        elif self.action == "skew":
            network.set_clock_skew(a[0], a[1], a[2] if len(a) > 2 else 1.0)
        else:
            raise ValueError(f"{self.action} aims at its targets: it runs in a Simulation")

    def describe(self) -> str:
        if self.action == "partition":
            return f"{self.at:g}s partition {','.join(sorted(self.args[0]))} | {','.join(sorted(self.args[1]))}"
        if self.action == "cut":
            return f"{self.at:g}s cut {' '.join(f'{x}-{y}' for x, y in self.args)}"
        if self.aims:
            return (
                f"{self.at:g}s {self.action} until {self.args[0]:g}s (episode seed {self.args[1]})"
            )
        return f"{self.at:g}s {self.action} {' '.join(str(x) for x in self.args)}".rstrip()

    def as_json(self) -> list[Any]:
        args = [_jsonable(x) for x in self.args]
        return [self.at, self.action, args]

    @classmethod
    def from_json(cls, row: Sequence[Any]) -> Fault:
        at, action, args = row
        return cls(float(at), str(action), tuple(_frozen(x) for x in args))


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def apply_fault(fault: Fault, arena: Arena) -> None:
    """Apply a scheduled fault now, or begin its aiming episode; one that does not apply
    (recovering a node that is up, say) goes to `arena.errors`, it does not stop the run."""
    try:
        if fault.aims:
            start_episode(arena, fault.action, fault.at, fault.args)
        else:
            fault.apply(arena.kernel.network)
    except ValueError as err:
        arena.errors.append(f"{fault.describe()}: {err}")


def tolerated(algorithm: str, n: int) -> int:
    """Nodes that may be down at once with the protocol still safe and live: f of
    n = 3f + 1 for PBFT, a minority for the others."""
    return bft_faults(n) if algorithm == "pbft" else n - quorum(n)


def planned_crashes(faults: Sequence[Fault]) -> list[tuple[float, float]]:
    """(crash, recovery) times of the crashes a schedule fixes."""
    out, open_at = [], {}
    for fault in sorted(faults, key=lambda f: f.at):
        if fault.action == "crash":
            open_at[fault.args[0]] = fault.at
        elif fault.action == "recover" and fault.args[0] in open_at:
            out.append((open_at.pop(fault.args[0]), fault.at))
    out.extend((start, float("inf")) for start in open_at.values())
    return out


@dataclass(slots=True)
class SimConfig:
    algorithm: str = "raft"
    nodes: int = 5
    seed: int = 0
    duration: float = 60.0
    latency_ms: tuple[float, float] = (10.0, 100.0)
    packet_loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    clients: int = 3
    workload: Workload = field(default_factory=Workload)
    faults: list[Fault] = field(default_factory=list)
    byzantine: dict[str, str] = field(default_factory=dict)  # PBFT: node -> behaviour
    protocol: dict[str, Any] = field(default_factory=dict)  # passed to the nodes as config
    progress_within: float = 10.0
    trace: bool = False
    max_check_states: int = 5_000_000

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got {self.nodes}")
        if not self.duration > 0:
            raise ValueError(f"duration must be positive, got {self.duration}")
        if self.clients < 0:
            raise ValueError(f"clients must be >= 0, got {self.clients}")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["faults"] = [f.as_json() for f in self.faults]
        out["latency_ms"] = list(self.latency_ms)
        return out


def scaled_timing(algorithm: str, latency_ms: tuple[float, float]) -> dict[str, Any]:
    """Protocol timeouts for slow networks: the defaults (Raft and Paxos elections of
    0.3-0.6 s, PBFT view changes after 1 s) assume one-way latency up to 100 ms; above
    that they grow with the latency, or no election ever settles."""
    high = latency_ms[1] / 1000.0
    if algorithm in ("raft", "paxos"):
        return {
            "election_timeout": (max(0.3, 3 * high), max(0.6, 6 * high)),
            "heartbeat": max(0.05, high / 2),
        }
    if algorithm == "pbft":
        return {"view_timeout": max(1.0, 10 * high), "retransmit": max(0.3, 3 * high)}
    return {}


def node_ids(n: int) -> list[str]:
    return [f"node_{i}" for i in range(n)]


class Simulation:
    """A cluster, its clients and its faults in one kernel; `finish()` checks the run."""

    def __init__(self, config: SimConfig, algorithm: Any = None) -> None:
        self.config = config
        self.algorithm = algorithm if algorithm is not None else load_algorithm(config.algorithm)
        self.kernel = Kernel(
            config.seed,
            NetworkConfig(config.latency_ms, config.packet_loss, config.duplicate, config.reorder),
            trace=config.trace,
        )
        self.network = self.kernel.network
        self.node_ids = node_ids(config.nodes)
        unknown = set(config.byzantine) - set(self.node_ids)
        if unknown:
            raise ValueError(f"byzantine nodes {sorted(unknown)} are not in the cluster")
        timing = scaled_timing(config.algorithm, config.latency_ms)
        if config.latency_ms[1] > 100.0:
            client_timeout = max(config.workload.timeout, 10 * config.latency_ms[1] / 1000.0)
            config.workload = replace(config.workload, timeout=client_timeout)
        for node_id in self.node_ids:
            peers = [p for p in self.node_ids if p != node_id]
            node_config = timing | dict(config.protocol)
            if config.byzantine:
                node_config["byzantine"] = dict(config.byzantine)  # {node: behaviour}
            self.kernel.spawn(self.algorithm, node_id, peers, node_config)
        self.history = History()
        processes = ProcessNumbers()
        module = importlib.import_module(self.algorithm.__module__)
        quorum_class = getattr(module, "ReplyQuorum", None)
        n = config.nodes
        reply_quorum = None if quorum_class is None else (lambda: quorum_class(n))
        self.clients = [
            SimClient(
                self.kernel,
                f"client_{i}",
                self.node_ids,
                self.history,
                processes,
                config.workload,
                stop_at=config.duration,
                reply_quorum=reply_quorum,
            )
            for i in range(config.clients)
        ]
        for i, client in enumerate(self.clients):
            client.start(0.2 + 0.01 * i)
        for fault in config.faults:
            self.kernel.call_at(fault.at, self._apply_fault, fault)
        self.fault_errors: list[str] = []
        self.arena = Arena(
            self.kernel,
            self.node_ids,
            self._tolerated(),
            frozenset(config.byzantine),
            planned_crashes(config.faults),
            self.fault_errors,
        )
        self.wall_seconds = 0.0

    def _apply_fault(self, fault: Fault) -> None:
        apply_fault(fault, self.arena)

    def run_until(self, until: float) -> None:
        started = time.perf_counter()
        self.kernel.run(until=until)
        self.wall_seconds += time.perf_counter() - started

    def finish(self) -> dict[str, Any]:
        """Run to the end (plus the clients' last timeouts), then check and report."""
        end = self.config.duration
        self.run_until(end + self.config.workload.timeout)
        return self.report(end)

    # -- checks ---------------------------------------------------------------------
    def check_linearizability(self) -> dict[str, Any]:
        try:
            verdict = check_history(self.history, "kv", max_states=self.config.max_check_states)
        except SearchBudgetExceeded as err:
            return {"verdict": "unknown", "reason": str(err)}
        out = verdict.as_dict()
        out["verdict"] = "ok" if verdict.linearizable else "violation"
        return out

    def check_invariants(self) -> dict[str, Any]:
        if self.config.algorithm not in ALGORITHMS:
            return {
                "verdict": "not-applicable",
                "reason": f"no invariants for {self.config.algorithm!r}",
                "violations": [],
            }
        try:
            invariants = importlib.import_module("twlb.sim.invariants")
        except ModuleNotFoundError as err:
            if err.name and "twlb.sim.invariants".startswith(err.name):
                return {"verdict": "unavailable", "violations": []}
            raise
        violations = invariants.check_invariants(
            self.config.algorithm,
            self.kernel.events,
            nodes=list(self.node_ids),
            byzantine=set(self.config.byzantine),
            faults=list(self.network.log),
            healed_at=self.healed_at(),
            end=self.config.duration,
            progress_within=self.config.progress_within,
        )
        return {
            "verdict": "violation" if violations else "ok",
            "violations": [
                {
                    "invariant": getattr(v, "invariant", type(v).__name__),
                    "detail": getattr(v, "detail", str(v)),
                }
                for v in violations
            ],
        }

    def healed_at(self) -> float | None:
        """When the last fault ended, if the network ends whole (no cut, nobody down but
        crash-stopped nodes, no loss above the configured one); else None."""
        net = self.network
        recoverable_down = [n for n, state in net.down.items() if state is not None]
        if net.partitions or recoverable_down or net.loss > self.config.packet_loss:
            return None
        fault_times = [t for t, action, _d in net.log if t > 0]
        return max(fault_times, default=0.0)

    def check_progress(self) -> dict[str, Any]:
        healed = self.healed_at()
        within = self.config.progress_within
        if not self.clients:
            return {"verdict": "not-applicable", "reason": "no clients"}
        if healed is None:
            return {"verdict": "not-applicable", "reason": "faults still active at the end"}
        stopped = sum(1 for state in self.network.down.values() if state is None)
        if stopped > self._tolerated():
            return {"verdict": "not-applicable", "reason": f"{stopped} nodes crash-stopped"}
        if healed + within > self.config.duration:
            return {"verdict": "not-applicable", "reason": "run ends too soon after the last fault"}
        completions = [
            e.time
            for e in self.history
            if e.type.value == "ok" and e.time is not None and e.time >= healed
        ]
        first = min(completions, default=None)
        ok = first is not None and first <= healed + within
        return {
            "verdict": "ok" if ok else "violation",
            "healed_at": healed,
            "within_s": within,
            "first_completion_after": None if first is None else round(first - healed, 6),
        }

    def _tolerated(self) -> int:
        return tolerated(self.config.algorithm, self.config.nodes)

    # -- report ---------------------------------------------------------------------
    def leadership(self) -> list[tuple[float, str, tuple[Any, ...]]]:
        """The first announcement of each new leader (term, ballot) or view: every PBFT
        replica announces the view it enters, so repeats are dropped."""
        seen: set[str] = set()
        out = []
        for t, node, ev in self.kernel.events:
            if ev and ev[0] in LEADERSHIP_EVENTS:
                key = repr(ev[:2])
                if key not in seen:
                    seen.add(key)
                    out.append((t, node, ev))
        return out

    def report(self, end: float | None = None) -> dict[str, Any]:
        end = self.config.duration if end is None else end
        checks = {
            "linearizability": self.check_linearizability(),
            "invariants": self.check_invariants(),
            "progress": self.check_progress(),
        }
        latencies = [
            lat for client in self.clients for _t, lat, f in client.latencies if f != "read"
        ]
        reads = [lat for client in self.clients for _t, lat, f in client.latencies if f == "read"]
        outcomes = Counter()
        for client in self.clients:
            outcomes.update(client.outcomes)
        event_counts = Counter(ev[0] for _t, _n, ev in self.kernel.events if ev)
        stats = self.kernel.stats
        return {
            "config": self.config.as_json(),
            "seed": self.config.seed,
            "messages": stats.as_dict(),
            "protocol_events": dict(sorted(event_counts.items())),
            "leader_changes": len(self.leadership()),
            "operations": dict(outcomes) | {"total": sum(outcomes.values())},
            "commit_latency_ms": percentiles(latencies),
            "read_latency_ms": percentiles(reads),
            "throughput_ops_per_s": round(outcomes["ok"] / end, 3),
            "wall_seconds": round(self.wall_seconds, 4),
            "deliveries_per_wall_second": round(stats.delivered / self.wall_seconds)
            if self.wall_seconds
            else None,
            "faults": [[t, action, _jsonable(d)] for t, action, d in self.network.log],
            "fault_errors": self.fault_errors,
            "checks": checks,
            "outcome": outcome(checks),
            "passed": outcome(checks) == "passed",
        }


def outcome(checks: Mapping[str, Mapping[str, Any]]) -> str:
    """ "violation" when a check found one; else "undecided" when a check could not
    decide (the linearizability search ran out of its budget); else "passed"."""
    verdicts = {c["verdict"] for c in checks.values()}
    if "violation" in verdicts:
        return "violation"
    if "unknown" in verdicts:
        return "undecided"
    return "passed"


def percentiles(samples: Sequence[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(samples)
    if len(ordered) == 1:
        cuts = [ordered[0]] * 99
    else:
        cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "count": len(ordered),
        "p50": round(cuts[49] * 1000, 3),
        "p90": round(cuts[89] * 1000, 3),
        "p99": round(cuts[98] * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


__all__ = [
    "ACTIONS",
    "ALGORITHMS",
    "apply_fault",
    "Fault",
    "outcome",
    "planned_crashes",
    "tolerated",
    "SimConfig",
    "Simulation",
    "load_algorithm",
    "node_ids",
    "percentiles",
]
