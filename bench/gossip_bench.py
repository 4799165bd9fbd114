"""Benchmark gossip failure detection on the simulator (virtual time, the same cores the
backends run), with memberlist's bounds side by side in one run.

Figures, each printed and written to reports/bench/gossip.json (plots to --plots):
  * swim at N = 10, 100, 1,000 and 1% loss: p99 time to full agreement, from the kill
    and from the first suspicion, beside memberlist's suspicion timeout at that N
    (SuspicionMult 4 x max(1, log10 N) x 1 s) plus one probe interval;
  * swim, one simulated hour of 60 nodes at 5% loss with 5% slow nodes (each reads
    every message 0.2-0.8 s late): false positives (target: none);
  * messages and bytes per node per second at each N (target: flat in N);
  * 1,000 swim nodes for 60 simulated seconds: wall time on one core (target: < 60 s),
    and 10,000 nodes for the same 60 s, to say what it reaches;
  * round-robin and binary round-robin: rounds to agreement against N beside the
    analytic expectation (dissemination rounds + T_fail / interval);
  * every protocol against N and against loss (plots).

Run: .venv/bin/python bench/gossip_bench.py [--quick] [--out reports/bench/gossip.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from twlb.gossip.nodes import PROTOCOLS
from twlb.gossip.swim import SwimConfig
from twlb.sim.gossip import Scenario, run_scenario, summarize
from twlb.sim.gossip_cli import ROUNDS_COLUMNS, SUMMARY_COLUMNS, plot, table


def point(protocol: str, n: int, runs: int, **kw: Any) -> dict[str, Any]:
    results = [run_scenario(Scenario(protocol, n, seed=1 + r, **kw)) for r in range(runs)]
    return summarize(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/bench/gossip.json"))
    parser.add_argument("--plots", type=Path, default=Path("reports/bench"))
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    parser.add_argument("--ten-thousand", action="store_true", help="also 10,000 swim nodes")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)
    scale = 0.25 if args.quick else 1.0
    out: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version()}
    cfg = SwimConfig()

    # 1. swim agreement against memberlist's bound
    plan = {10: (30, 1), 100: (10, 2), 1000: (2, 3)}
    swim_rows = []
    for n, (runs, fail) in plan.items():
        row = point("swim", n, max(1, round(runs * scale)), loss=0.01, fail=fail)
        bound = cfg.memberlist_suspicion_timeout(n) + cfg.probe_interval
        row["memberlist_bound_s"] = bound
        row["p99_from_kill_below_bound"] = (row["agreement_p99_s"] or 1e9) < bound
        row["p99_from_suspicion_below_bound"] = (
            row["agreement_after_first_suspicion_p99_s"] or 1e9
        ) < bound
        swim_rows.append(row)
        print(
            f"swim N={n}: agreement p99 {row['agreement_p99_s']:.2f} s from the kill, "
            f"{row['agreement_after_first_suspicion_p99_s']:.2f} s from the first suspicion; "
            f"memberlist suspicion timeout + probe interval {bound:.1f} s "
            f"({row['failures']} failures); {row['messages_per_node_s']:.2f} msg/node/s, "
            f"{row['bytes_per_node_s']:.0f} B/node/s; CPU {row['cpu_s']:.1f} s",
            flush=True,
        )
    out["swim_vs_memberlist"] = swim_rows

    # 2. an hour at 5% loss with 5% slow nodes
    hour = point("swim", 60, 1, loss=0.05, slow_fraction=0.05, fail=0, duration=3600.0)
    print(
        f"swim N=60 (3 slow), 1 h, 5% loss, 5% slow: {hour['false_positives']} false positives "
        f"({hour['false_positives_per_node_hour']:.4f} per node-hour); CPU {hour['cpu_s']:.1f} s",
        flush=True,
    )
    out["swim_hour_lossy_slow"] = hour

    # 3. steady state (no failure): messages and bytes per node per second against N
    steady = []
    for n in (10, 100, 1000):
        row = point("swim", n, 1, loss=0.01, fail=0, duration=60.0)
        steady.append(row)
        print(
            f"swim N={n}, no failure, 60 s: {row['messages_per_node_s']:.2f} msg/node/s, "
            f"{row['bytes_per_node_s']:.0f} B/node/s",
            flush=True,
        )
    out["swim_steady_state"] = steady

    # 4. scale: 1,000 (and with --ten-thousand 10,000) nodes for 60 simulated seconds,
    # one killed at 10 s; CPU time is the fair figure on a shared machine
    scale_rows = []
    for n in (1000, 10_000) if args.ten_thousand else (1000,):
        r = run_scenario(Scenario("swim", n, loss=0.01, fail=1, fail_at=10.0, duration=60.0))
        row = {
            "nodes": n,
            "sim_s": 60.0,
            "wall_s": r.wall_s,
            "cpu_s": r.cpu_s,
            "events": r.events,
            "messages_per_node_s": r.messages / n / 60.0,
            "failure": r.failures[0] if r.failures else None,
        }
        scale_rows.append(row)
        print(
            f"swim N={n}: 60 simulated s in {r.cpu_s:.1f} s CPU ({r.wall_s:.1f} s wall, "
            f"{r.events} events, {row['messages_per_node_s']:.2f} msg/node/s); the node "
            f"killed at 10 s: {row['failure']}",
            flush=True,
        )
    out["swim_scale"] = scale_rows

    # 5. rounds to agreement, and every protocol against N and loss
    sizes = [8, 16, 32, 64, 128]
    by_n = []
    for protocol in PROTOCOLS:
        for n in sizes:
            runs = max(1, round((2 if n <= 64 else 1) * scale))
            by_n.append(point(protocol, n, runs, loss=0.01, fail=1))
        print(f"{protocol}: N = {sizes} done", flush=True)
    by_loss = []
    for protocol in PROTOCOLS:
        for loss in (0.0, 0.05, 0.1, 0.2):
            by_loss.append(point(protocol, 32, 1, loss=loss, fail=1))
    out["by_nodes"] = by_n
    out["by_loss"] = by_loss
    rounds = [r for r in by_n if r["protocol"] in ("round-robin", "binary-round-robin")]
    print("\n" + table(rounds, ROUNDS_COLUMNS))
    print("\n" + table(by_n, SUMMARY_COLUMNS))
    print("\n" + table(by_loss, SUMMARY_COLUMNS))
    plot(
        by_n,
        "nodes",
        args.plots / "gossip-vs-nodes.png",
        "gossip failure detection against N (1% loss)",
    )
    plot(
        by_loss,
        "loss",
        args.plots / "gossip-vs-loss.png",
        "gossip failure detection against loss (N = 32)",
    )
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} and plots under {args.plots}")


if __name__ == "__main__":
    main()
