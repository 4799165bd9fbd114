"""Benchmarks of the simulator with the real protocols, printed and written as JSON, with
plots for docs/simulator.md:

1. simulated message deliveries per second of wall time, five-node Raft under load
   (target: at least 50,000 on one core, printed beside the figure);
2. commit latency (client-observed, p50 and p99) against packet loss and against the
   network's latency, per algorithm;
3. messages per committed operation against cluster size, per algorithm (PBFT's
   all-to-all phases make it grow as n^2);
4. time from the leader's (primary's) crash to the next leader (view), per algorithm.

    .venv/bin/python bench/sim_bench.py --output docs/results/sim-bench.json --figures docs/results

Every run here is also checked (linearizability and invariants); a failed check is
reported in the JSON and makes the script exit 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from twlb.sim.algorithms import ALGORITHMS  # noqa: E402
from twlb.sim.history import Workload  # noqa: E402
from twlb.sim.runner import LEADERSHIP_EVENTS, SimConfig, Simulation  # noqa: E402

TARGET_DELIVERIES_PER_S = 50_000
FAILED: list[str] = []
UNDECIDED: list[str] = []  # the linearizability search ran out of budget: not a failure


def note(what: str, report: dict[str, Any]) -> None:
    if report["outcome"] == "violation":
        FAILED.append(f"{what}: {report['checks']}")
    elif report["outcome"] == "undecided":
        UNDECIDED.append(what)


def simulate(config: SimConfig) -> tuple[Simulation, dict[str, Any]]:
    sim = Simulation(config)
    report = sim.finish()
    note(f"{config.algorithm} seed {config.seed}", report)
    return sim, report


def deliveries_per_second(repeats: int, duration: float) -> dict[str, Any]:
    rates = []
    for seed in range(repeats):
        config = SimConfig(
            algorithm="raft",
            nodes=5,
            seed=seed,
            duration=duration,
            clients=50,
            workload=Workload(think=0.0, timeout=2.0, keys=tuple(f"k{i}" for i in range(25))),
            latency_ms=(10.0, 100.0),
        )
        sim = Simulation(config)
        started, cpu_started = time.perf_counter(), time.process_time()
        sim.run_until(duration)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        delivered = sim.kernel.stats.delivered
        rates.append(
            {
                "delivered": delivered,
                "wall_s": wall,
                "cpu_s": cpu,
                "deliveries_per_s": delivered / wall,
                # On a shared, oversubscribed machine the process does not get a whole
                # core: per CPU-second is what one core would deliver.
                "deliveries_per_cpu_s": delivered / cpu,
                "ops_ok": sum(c.outcomes["ok"] for c in sim.clients),
            }
        )
        report = sim.report(duration)
        note(f"deliveries bench seed {seed}", report)
    best = max(r["deliveries_per_s"] for r in rates)
    best_cpu = max(r["deliveries_per_cpu_s"] for r in rates)
    return {
        "best_deliveries_per_cpu_s": best_cpu,
        "workload": "5-node raft, 50 closed-loop clients without think time on 25 keys, latency 10..100 ms",
        "simulated_seconds": duration,
        "runs": rates,
        "best_deliveries_per_s": best,
        "median_deliveries_per_s": statistics.median(r["deliveries_per_s"] for r in rates),
        "target_deliveries_per_s": TARGET_DELIVERIES_PER_S,
        "meets_target_wall": best >= TARGET_DELIVERIES_PER_S,
        "meets_target_cpu": best_cpu >= TARGET_DELIVERIES_PER_S,
    }


def nodes_for(algorithm: str) -> int:
    return 4 if algorithm == "pbft" else 5


def latency_against(
    algorithms: list[str], knob: str, values: list[Any], duration: float, seeds: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for algorithm in algorithms:
        rows = []
        for value in values:
            lat = []
            ops = 0
            for seed in range(seeds):
                kwargs = (
                    {"packet_loss": value}
                    if knob == "packet_loss"
                    else {"latency_ms": tuple(value)}
                )
                config = SimConfig(
                    algorithm=algorithm,
                    nodes=nodes_for(algorithm),
                    seed=seed,
                    duration=duration,
                    clients=5,
                    **kwargs,
                )
                sim, report = simulate(config)
                lat.extend(x for c in sim.clients for _t, x, f in c.latencies if f != "read")
                ops += report["operations"].get("ok", 0)
            rows.append(
                {
                    knob: value,
                    "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
                    "p99_ms": round(1000 * statistics.quantiles(lat, n=100)[98], 2)
                    if len(lat) > 1
                    else None,
                    "commits": len(lat),
                    "ops_ok": ops,
                }
            )
            print(
                f"  {algorithm:6s} {knob}={value}: p50 {rows[-1]['p50_ms']} ms, p99 {rows[-1]['p99_ms']} ms ({len(lat)} commits)"
            )
        out[algorithm] = rows
    return out


def messages_per_op(
    algorithms: list[str], sizes: dict[str, list[int]], duration: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for algorithm in algorithms:
        rows = []
        for n in sizes[algorithm]:
            config = SimConfig(
                algorithm=algorithm,
                nodes=n,
                seed=1,
                duration=duration,
                clients=5,
                latency_ms=(1.0, 5.0),
            )
            _sim, report = simulate(config)
            ok = report["operations"].get("ok", 0)
            rows.append(
                {
                    "nodes": n,
                    "messages_sent": report["messages"]["sent"],
                    "ops_ok": ok,
                    "messages_per_op": round(report["messages"]["sent"] / ok, 2) if ok else None,
                }
            )
            print(
                f"  {algorithm:6s} n={n}: {rows[-1]['messages_per_op']} messages per committed operation"
            )
        out[algorithm] = rows
    return out


def failover(algorithms: list[str], seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for algorithm in algorithms:
        times = []
        for seed in range(seeds):
            config = SimConfig(
                algorithm=algorithm, nodes=nodes_for(algorithm), seed=seed, duration=30.0, clients=3
            )
            sim = Simulation(config)
            sim.run_until(5.0)
            from twlb.sim.visualize import leader_at

            leader = leader_at(sim, 5.0)
            if leader is None:
                continue
            crash_at = sim.kernel.now
            sim.network.fail_node(leader)
            sim.run_until(30.0)
            after = [
                t
                for t, node, ev in sim.kernel.events
                if t > crash_at and ev and ev[0] in LEADERSHIP_EVENTS
            ]
            if after:
                times.append(after[0] - crash_at)
            report = sim.report(30.0)
            if (
                report["checks"]["linearizability"]["verdict"] == "violation"
                or report["checks"]["invariants"]["verdict"] == "violation"
            ):
                FAILED.append(f"failover {algorithm} seed {seed}: {report['checks']}")
        out[algorithm] = {
            "runs": seeds,
            "measured": len(times),
            "mean_s": round(statistics.mean(times), 4) if times else None,
            "p50_s": round(statistics.median(times), 4) if times else None,
            "max_s": round(max(times), 4) if times else None,
        }
        print(f"  {algorithm:6s} new leader/view after the leader's crash: {out[algorithm]}")
    return out


def plot(results: dict[str, Any], figures: Path) -> list[str]:
    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, rows in results["latency_vs_loss"].items():
        xs = [r["packet_loss"] for r in rows]
        axes[0].plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{algorithm} p50")
        axes[0].plot(
            xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label=f"{algorithm} p99"
        )
    axes[0].set_xlabel("packet loss")
    axes[0].set_ylabel("commit latency (ms)")
    axes[0].set_title("commit latency vs packet loss")
    axes[0].legend(fontsize=7)
    for algorithm, rows in results["latency_vs_latency"].items():
        xs = [sum(r["latency_ms"]) / 2 for r in rows]
        axes[1].plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{algorithm} p50")
        axes[1].plot(
            xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label=f"{algorithm} p99"
        )
    axes[1].set_xlabel("mean one-way network latency (ms)")
    axes[1].set_title("commit latency vs network latency")
    axes[1].legend(fontsize=7)
    path = figures / "sim-latency.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4))
    for algorithm, rows in results["messages_per_op"].items():
        ax.plot(
            [r["nodes"] for r in rows],
            [r["messages_per_op"] for r in rows],
            marker="o",
            label=algorithm,
        )
    ax.set_xlabel("nodes")
    ax.set_ylabel("messages sent per committed operation")
    ax.set_title("message cost per operation vs cluster size")
    ax.legend()
    path = figures / "sim-messages-per-op.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("reports/sim-bench.json"))
    parser.add_argument("--figures", type=Path, default=Path("reports"))
    parser.add_argument("--duration", type=float, default=20.0, help="Simulated seconds per run.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per point.")
    parser.add_argument(
        "--failover-seeds", type=int, default=10, help="Leader crashes measured per algorithm."
    )
    parser.add_argument(
        "--algorithms", default=",".join(a for a in ("raft", "paxos", "pbft") if a in ALGORITHMS)
    )
    args = parser.parse_args()
    algorithms = [a for a in args.algorithms.split(",") if a]
    started = time.perf_counter()
    results: dict[str, Any] = {"algorithms": algorithms}
    print("1. deliveries per second of wall time (5-node raft under load)")
    results["deliveries"] = deliveries_per_second(3, args.duration)
    d = results["deliveries"]
    print(
        f"  per CPU-second {d['best_deliveries_per_cpu_s']:,.0f}/s; best {d['best_deliveries_per_s']:,.0f}/s, median {d['median_deliveries_per_s']:,.0f}/s; target {TARGET_DELIVERIES_PER_S:,}/s"
    )
    print("2. commit latency vs packet loss")
    results["latency_vs_loss"] = latency_against(
        algorithms, "packet_loss", [0.0, 0.1, 0.2, 0.3], args.duration, args.seeds
    )
    print("   commit latency vs network latency")
    results["latency_vs_latency"] = latency_against(
        algorithms,
        "latency_ms",
        [[1, 5], [10, 100], [50, 200], [100, 400]],
        args.duration,
        args.seeds,
    )
    print("3. messages per committed operation vs cluster size (latency 1..5 ms, 5 clients)")
    sizes = {a: ([4, 7, 10] if a == "pbft" else [3, 5, 7, 9]) for a in algorithms}
    results["messages_per_op"] = messages_per_op(algorithms, sizes, args.duration)
    print("4. time to a new leader or view after the leader crashes")
    results["failover"] = failover(algorithms, args.failover_seeds)
    results["figures"] = plot(results, args.figures)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["failed_checks"] = FAILED
    results["undecided_checks"] = UNDECIDED
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output} and {', '.join(results['figures'])} in {results['wall_seconds']} s")
    if UNDECIDED:
        print(f"{len(UNDECIDED)} checked runs undecided:", *UNDECIDED[:5], sep="\n  ")
    if FAILED:
        print(f"{len(FAILED)} checked runs FAILED:", *FAILED[:5], sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
