"""`twlb sim sweep`: many seeds, each with a random fault schedule, every run checked.

A schedule is a list of fault episodes, all over before `duration - progress_within` so
that the progress check applies. Plain episodes are fixed faults and their repair: a
partition and its heal, a bridge or a ring partition (`twlb.sim.nemesis.bridge_halves`,
`ring_cuts`) and its heal, a crash and its recovery, a burst of loss (duplication,
reordering) and its end, a pause, a clock running fast or slow and its reset. Aiming
episodes (`twlb.sim.nemesis.TARGETED`: faults at the leader, partitions around it,
isolation in the instant after it appends, crashes in the instant after a vote, clock
faults) are one row each and choose their targets as the run goes.

The nemeses named are spread over the seeds: seed s draws all its episodes from the
(s mod k)-th of the k named (so each gets a k-th of the runs, and one seed gives the same
schedule whatever the first seed of the sweep); with `mix`, every episode draws its kind
from all of them. "byzantine" is not drawn: it makes f replicas Byzantine in every run.

On a violation the schedule is shrunk: episodes are removed one at a time (repeatedly,
until none can go) as long as the same seed still fails, and the minimal schedule is
printed with a command that replays it. A run the linearizability checker could not
decide within its search budget is "undecided": counted apart, never as a violation.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from twlb.sim.nemesis import TARGETED, bridge_halves, ring_cuts
from twlb.sim.runner import Fault, SimConfig, Simulation, node_ids, tolerated

#: Plain nemeses (fixed faults), the aiming ones, and the "byzantine" modifier.
PLAIN = (
    "partition",
    "loss",
    "crash",
    "pause",
    "duplicate",
    "reorder",
    "skew",
    "bridge",
    "ring",
)
NEMESES = (*PLAIN, *TARGETED, "byzantine")

Episode = list[Fault]


def check_nemeses(nemeses: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(nemeses) - set(NEMESES))
    if unknown:
        raise ValueError(f"unknown nemesis {', '.join(unknown)}; choose from {', '.join(NEMESES)}")
    return tuple(nemeses)


def random_schedule(
    rng: random.Random,
    nodes: Sequence[str],
    max_down: int,
    nemeses: Sequence[str],
    start: float,
    stop: float,
    episodes: int,
    base_loss: float = 0.0,
) -> list[Episode]:
    """Random fault episodes in [start, stop], their kinds drawn from `nemeses`; fixed
    crashes never put more than `max_down` nodes down at once (the aiming ones check
    the same bound as they strike), so a correct protocol must stay safe and live."""
    out: list[Episode] = []
    kinds = [k for k in check_nemeses(nemeses) if k != "byzantine"]
    if not kinds:
        return out
    crashes: list[tuple[str, float, float]] = []
    for _ in range(episodes):
        kind = rng.choice(kinds)
        at = round(rng.uniform(start, stop - 1.0), 3)
        if kind in TARGETED:
            until = round(min(stop, at + rng.uniform(2.0, 8.0)), 3)
            out.append([Fault(at, kind, (until, rng.randrange(2**31)))])
            continue
        until = round(min(stop, at + rng.uniform(0.5, 6.0)), 3)
        if kind == "partition":
            members = list(nodes)
            rng.shuffle(members)
            cut = rng.randint(1, len(members) - 1)
            side_a, side_b = tuple(sorted(members[:cut])), tuple(sorted(members[cut:]))
            out.append([Fault(at, "partition", (side_a, side_b)), Fault(until, "heal")])
        elif kind == "bridge":
            side_a, side_b = bridge_halves(rng, nodes)
            if side_a and side_b:
                out.append([Fault(at, "partition", (side_a, side_b)), Fault(until, "heal")])
        elif kind == "ring":
            cuts = ring_cuts(rng, nodes)
            if cuts:
                out.append([Fault(at, "cut", cuts), Fault(until, "heal")])
        elif kind == "crash":
            busy = {n for n, s, e in crashes if not (until < s or at > e)}
            if len(busy) >= max_down:
                continue
            node = rng.choice([n for n in nodes if n not in busy])
            crashes.append((node, at, until + 0.001))
            out.append([Fault(at, "crash", (node,)), Fault(until, "recover", (node,))])
        elif kind == "loss":
            out.append(
                [
                    Fault(at, "loss", (round(rng.uniform(0.05, 0.4), 3),)),
                    Fault(until, "loss", (base_loss,)),
                ]
            )
        elif kind == "duplicate":
            out.append(
                [
                    Fault(at, "duplicate", (round(rng.uniform(0.05, 0.3), 3),)),
                    Fault(until, "duplicate", (0.0,)),
                ]
            )
        elif kind == "reorder":
            out.append(
                [
                    Fault(at, "reorder", (round(rng.uniform(0.1, 0.5), 3),)),
                    Fault(until, "reorder", (0.0,)),
                ]
            )
        elif kind == "pause":
            out.append([Fault(at, "pause", (rng.choice(list(nodes)), round(until - at, 3)))])
        elif kind == "skew":
            node = rng.choice(list(nodes))
            rate = round(rng.choice([rng.uniform(0.5, 0.9), rng.uniform(1.1, 2.0)]), 3)
            out.append(
                [Fault(at, "skew", (node, 0.0, rate)), Fault(until, "skew", (node, 0.0, 1.0))]
            )
    return out


def nemesis_of(nemeses: Sequence[str], seed: int, mix: bool) -> tuple[str, ...]:
    """The nemeses seed `seed` draws its episodes from (see the module doc)."""
    kinds = [k for k in nemeses if k != "byzantine"]
    if mix or len(kinds) <= 1:
        return tuple(kinds)
    return (kinds[seed % len(kinds)],)


def flatten(episodes: Sequence[Episode]) -> list[Fault]:
    return sorted((f for ep in episodes for f in ep), key=lambda f: f.at)


@dataclass(slots=True)
class SweepSettings:
    algorithm: str = "raft"
    nodes: int = 5
    duration: float = 30.0
    progress_within: float = 10.0
    packet_loss: float = 0.0
    latency_ms: tuple[float, float] = (10.0, 100.0)
    clients: int = 3
    nemeses: tuple[str, ...] = ("partition", "loss", "crash")
    episodes: int = 4
    byzantine_behaviours: tuple[str, ...] = ()
    protocol: dict[str, Any] = field(default_factory=dict)
    mix: bool = False
    max_check_states: int | None = None  # the linearizability search's budget (SimConfig's)

    def __post_init__(self) -> None:
        self.nemeses = check_nemeses(self.nemeses)

    def nemesis_of(self, seed: int) -> tuple[str, ...]:
        return nemesis_of(self.nemeses, seed, self.mix)

    def config(self, seed: int) -> tuple[SimConfig, list[Episode]]:
        rng = random.Random(f"schedule/{seed}")
        ids = node_ids(self.nodes)
        last = self.duration - self.progress_within - 1.0
        schedule = random_schedule(
            rng,
            ids,
            tolerated(self.algorithm, self.nodes),
            self.nemesis_of(seed),
            1.0,
            max(2.0, last),
            self.episodes,
            self.packet_loss,
        )
        byzantine = {}
        if "byzantine" in self.nemeses and self.byzantine_behaviours:
            for node in rng.sample(ids, tolerated(self.algorithm, self.nodes)):
                byzantine[node] = rng.choice(self.byzantine_behaviours)
        budget = (
            {} if self.max_check_states is None else {"max_check_states": self.max_check_states}
        )
        return SimConfig(
            **budget,
            algorithm=self.algorithm,
            nodes=self.nodes,
            seed=seed,
            duration=self.duration,
            latency_ms=self.latency_ms,
            packet_loss=self.packet_loss,
            clients=self.clients,
            faults=flatten(schedule),
            byzantine=byzantine,
            progress_within=self.progress_within,
            protocol=dict(self.protocol),
        ), schedule


def run_config(config: SimConfig, algorithm: Any = None) -> dict[str, Any]:
    return Simulation(config, algorithm=algorithm).finish()


def failed_checks(report: dict[str, Any]) -> list[str]:
    return [name for name, c in report["checks"].items() if c["verdict"] == "violation"]


def shrink(
    config: SimConfig, schedule: list[Episode], algorithm: Any = None, budget: int = 60
) -> tuple[list[Episode], dict[str, Any]]:
    """Remove fault episodes while the run still fails (any check); at most `budget` runs."""
    current = list(schedule)
    report = run_config(replace(config, faults=flatten(current)), algorithm)
    runs = 1
    changed = True
    while changed and runs < budget:
        changed = False
        for i in range(len(current)):
            trial = current[:i] + current[i + 1 :]
            candidate = run_config(replace(config, faults=flatten(trial)), algorithm)
            runs += 1
            if failed_checks(candidate):
                current, report, changed = trial, candidate, True
                break
            if runs >= budget:
                break
    return current, report


def replay_command(config: SimConfig) -> str:
    faults = json.dumps([f.as_json() for f in config.faults], separators=(",", ":"))
    parts = [
        "twlb sim",
        f"--algorithm {config.algorithm}",
        f"--nodes {config.nodes}",
        f"--seed {config.seed}",
        f"--duration {config.duration:g}",
        f"--latency {config.latency_ms[0]:g} {config.latency_ms[1]:g}",
        f"--clients {config.clients}",
        f"--progress-within {config.progress_within:g}",
    ]
    if config.packet_loss:
        parts.append(f"--packet-loss {config.packet_loss:g}")
    for node, mode in sorted(config.byzantine.items()):
        parts.append(f"--byzantine {node}={mode}")
    if config.protocol.get("bug"):
        parts.append(f"--bug {config.protocol['bug']}")
    if config.max_check_states != SimConfig().max_check_states:
        parts.append(f"--max-check-states {config.max_check_states}")
    parts.append(f"--faults '{faults}'")
    return " ".join(parts)


def _one(args: tuple[SweepSettings, int, Any]) -> dict[str, Any]:
    settings, seed, algorithm = args
    config, _schedule = settings.config(seed)
    started = time.perf_counter()
    report = run_config(config, algorithm)
    return {
        "seed": seed,
        "nemesis": "+".join(settings.nemesis_of(seed)),
        "outcome": report["outcome"],
        "passed": report["passed"],
        "failed_checks": failed_checks(report),
        "verdicts": {k: v["verdict"] for k, v in report["checks"].items()},
        "operations_ok": report["operations"].get("ok", 0),
        "leader_changes": report["leader_changes"],
        "delivered": report["messages"]["delivered"],
        "faults": len(report["faults"]),  # as applied: aiming episodes strike many times
        "wall_seconds": time.perf_counter() - started,
    }


def run_seeds(
    job: Callable[[Any], dict[str, Any]],
    jobs: Sequence[Any],
    workers: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    time_limit: float | None = None,
) -> list[dict[str, Any]]:
    """`job(j)` for every j (in `workers` processes; `job` must be a module-level
    function), results in order; stop starting new ones after `time_limit` seconds."""
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for one in jobs:
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
            results.append(job(one))
            if on_result:
                on_result(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = workers * 4
        for i in range(0, len(jobs), chunk):
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
            for result in pool.map(job, jobs[i : i + chunk]):
                results.append(result)
                if on_result:
                    on_result(result)
    return results


def sweep(
    settings: SweepSettings,
    seeds: Sequence[int],
    workers: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    time_limit: float | None = None,
    algorithm: Any = None,
) -> list[dict[str, Any]]:
    """Run every seed (in `workers` processes); stop starting new ones after `time_limit`
    seconds of wall time. Results come back in seed order."""
    jobs = [(settings, seed, algorithm) for seed in seeds]
    return run_seeds(_one, jobs, workers, on_result, time_limit)


def summarise(results: Sequence[dict[str, Any]], wall: float) -> dict[str, Any]:
    failures = Counter(c for r in results for c in r["failed_checks"])
    by_nemesis: dict[str, dict[str, int]] = {}
    for r in results:
        row = by_nemesis.setdefault(r["nemesis"], {"runs": 0, "violations": 0, "undecided": 0})
        row["runs"] += 1
        row["violations"] += r["outcome"] == "violation"
        row["undecided"] += r["outcome"] == "undecided"
    return {
        "runs": len(results),
        "passed": sum(r["outcome"] == "passed" for r in results),
        "violations": sum(r["outcome"] == "violation" for r in results),
        "undecided": sum(r["outcome"] == "undecided" for r in results),
        "violations_by_check": dict(failures),
        "failing_seeds": [r["seed"] for r in results if r["outcome"] == "violation"],
        "undecided_seeds": [r["seed"] for r in results if r["outcome"] == "undecided"],
        "by_nemesis": dict(sorted(by_nemesis.items())),
        "operations_ok": sum(r["operations_ok"] for r in results),
        "leader_changes": sum(r["leader_changes"] for r in results),
        "faults_injected": sum(r["faults"] for r in results),
        "messages_delivered": sum(r["delivered"] for r in results),
        "wall_seconds": round(wall, 2),
        "mean_wall_per_run": round(wall / len(results), 4) if results else None,
    }


def exit_status(summary: dict[str, Any]) -> int:
    """1 when a run found a violation; else 3 when a run was undecided; else 0."""
    if summary["violations"]:
        return 1
    return 3 if summary["undecided"] else 0


__all__ = [
    "NEMESES",
    "PLAIN",
    "check_nemeses",
    "exit_status",
    "nemesis_of",
    "SweepSettings",
    "random_schedule",
    "shrink",
    "sweep",
    "summarise",
    "replay_command",
    "run_config",
    "run_seeds",
]
