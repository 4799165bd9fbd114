"""Benchmark gossip failure detection on the simulator (virtual time, the same cores the
backends run), with memberlist's settings (`--gossip-profile memberlist`, the same code
with memberlist's DefaultLANConfig) measured side by side in the same run.

Sections (all by default; `--sections a,b` picks some), each printed and written to
--out (JSON):
  bound       swim at N = 10, 100, 1,000 and 1% loss: p99 time from the kill to the
              first death verdict and to full agreement, beside memberlist's suspicion
              timeout at that N plus one probe interval (4 x max(1, log10 N) + 1 s), and
              memberlist's profile on the same kills;
  slow        the false-positive table of docs/gossip.md (its rows: N = 10 with
              one node 1-2 s late at 5% and 20% loss, 5 seeds, 600 s; N = 30 with three,
              3 seeds; N = 100 with 10% of nodes 2-3 s late, 120 s), for this project's
              settings, memberlist's, and the shortened rule without health windows;
  lag         how late a slow node may read before it is declared dead: N = 10, one slow
              node, 5% loss, 5 seeds of 600 s, lags from 0.5-1 s to 6-8 s, and lags
              that straddle the probe interval at 5% and 20% loss, both profiles;
  fallback    false suspicions per probe at N = 1,000 and 5% loss (60 s), with the direct
              ping retransmitted twice (this project) and not at all (memberlist over
              UDP alone), and the messages per node per second each costs;
  load        messages and bytes per node per second at 5% loss, N = 10, 100, 1,000
              (target: within 20% of each other), both profiles;
  sequence    round robin, sequence-check and consensus on the same kills at N = 10, 32,
              128 (1% loss): first detection, agreement, declarations made before every
              live member suspected;
  hour        swim, one simulated hour of 60 nodes at 5% loss with 5% slow nodes (0.2-0.8
              s late): false positives (target: none);
  scale       1,000 swim nodes for 60 simulated seconds (CPU time; --ten-thousand adds
              10,000);
  protocols   every protocol against N and against loss (plots), rounds to agreement
              beside the analytic expectation.
The runs are CPU heavy (1,000 nodes) and deterministic by seed; wall and CPU times are
printed, and on a shared machine the CPU time is the fair figure.

Run: .venv/bin/python bench/gossip_bench.py [--quick] [--sections bound,slow]
     [--out reports/bench/gossip.json] [--plots reports/bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twlb.gossip.nodes import PROTOCOLS
from twlb.gossip.swim import SwimConfig
from twlb.sim.gossip import Scenario, run_scenario, summarize
from twlb.sim.gossip_cli import ROUNDS_COLUMNS, SUMMARY_COLUMNS, plot, table

PROFILES = ("twlb", "memberlist")


def point(protocol: str, n: int, runs: int, **kw: Any) -> dict[str, Any]:
    started = time.perf_counter()
    results = [run_scenario(Scenario(protocol, n, seed=1 + r, **kw)) for r in range(runs)]
    row = summarize(results)
    row["bench_wall_s"] = time.perf_counter() - started
    return row


def bound_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    cfg = SwimConfig()
    plan = {10: (30, 1), 100: (10, 2), 1000: (2, 3)}
    rows = []
    for n, (runs, fail) in plan.items():
        bound = cfg.memberlist_suspicion_timeout(n) + cfg.probe_interval
        for profile in PROFILES:
            row = point(
                "swim", n, max(1, round(runs * scale)), loss=0.01, fail=fail, profile=profile
            )
            row["memberlist_bound_s"] = bound
            row["detection_p99_below_bound"] = (row["first_detection_p99_s"] or 1e9) < bound
            row["agreement_p99_below_bound"] = (row["agreement_p99_s"] or 1e9) < bound
            rows.append(row)
            print(
                f"bound swim/{profile} N={n}: first detection p99 {row['first_detection_p99_s']:.2f} s, "
                f"agreement p99 {row['agreement_p99_s']:.2f} s from the kill "
                f"({row['agreed']}/{row['failures']} agreed); memberlist's timeout + 1 "
                f"interval {bound:.1f} s; false verdicts {row['false_positives']}; "
                f"CPU {row['cpu_s']:.1f} s, wall {row['bench_wall_s']:.1f} s",
                flush=True,
            )
    return {"rows": rows}


SLOW_ROWS = (
    # (label, N, slow fraction, lag, loss, seeds, seconds): the table
    ("N=10, one node 1-2 s late, 5% loss", 10, 0.1, (1.0, 2.0), 0.05, 5, 600.0),
    ("N=10, one node 1-2 s late, 20% loss", 10, 0.1, (1.0, 2.0), 0.2, 5, 600.0),
    ("N=30, three nodes 1-2 s late, 5% loss", 30, 0.1, (1.0, 2.0), 0.05, 3, 600.0),
    ("N=100, 10% of nodes 2-3 s late, 5% loss", 100, 0.1, (2.0, 3.0), 0.05, 1, 120.0),
)
#: the settings compared: ours, memberlist's, and ours without the health windows (the
#: shortened rule as it was before them)
SLOW_SETTINGS: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
    ("twlb", "twlb", ()),
    ("memberlist", "memberlist", ()),
    ("twlb without health windows", "twlb", (("health_windows", False),)),
)


def slow_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for label, n, frac, lag, loss, seeds, seconds in SLOW_ROWS:
        for name, profile, overrides in SLOW_SETTINGS:
            row = point(
                "swim",
                n,
                max(1, round(seeds * scale)),
                loss=loss,
                fail=0,
                slow_fraction=frac,
                slow_lag_s=lag,
                duration=seconds,
                profile=profile,
                overrides=overrides,
            )
            row["row"] = label
            row["settings"] = name
            rows.append(row)
            print(
                f"slow {label} [{name}]: {row['false_positives']} false death verdicts "
                f"({row['runs_with_false_positives']} of {row['runs']} runs); "
                f"{row['messages_per_node_s']:.2f} msg/node/s; CPU {row['cpu_s']:.1f} s",
                flush=True,
            )
    return {"rows": rows}


LAGS = ((0.5, 1.0), (0.8, 1.2), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 6.0), (6.0, 8.0))
STRADDLING = ((0.8, 1.2), (0.9, 1.1), (0.95, 1.05))


def lag_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    rows = []
    plan = [(lag, 0.05) for lag in LAGS] + [(lag, 0.2) for lag in STRADDLING]
    plan.insert(2, ((0.9, 1.1), 0.05))
    plan.insert(3, ((0.95, 1.05), 0.05))
    for lag, loss in plan:
        for profile in PROFILES:
            row = point(
                "swim",
                10,
                max(1, round(5 * scale)),
                loss=loss,
                fail=0,
                slow_fraction=0.1,
                slow_lag_s=lag,
                duration=600.0,
                profile=profile,
            )
            rows.append(row)
            print(
                f"lag {lag[0]}-{lag[1]} s, {loss:.0%} loss, swim/{profile}: "
                f"{row['false_positives']} false death verdicts "
                f"({row['runs_with_false_positives']} of {row['runs']} runs)",
                flush=True,
            )
    return {"rows": rows}


def fallback_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for pings in (2, 0):
        r = run_scenario(
            Scenario(
                "swim",
                1000,
                loss=0.05,
                fail=0,
                duration=60.0,
                overrides=(("fallback_pings", pings),),
            )
        )
        probes = 1000 * 60
        refutes = r.extra["events"].get("refute", 0)
        row = {
            "fallback_pings": pings,
            "probes": probes,
            "refutations": refutes,
            "refutations_per_probe": refutes / probes,
            "messages_per_node_s": r.messages / probes,
            "cpu_s": r.cpu_s,
        }
        rows.append(row)
        print(
            f"fallback {pings} direct pings again: {refutes} refuted suspicions in {probes} "
            f"probes; {row['messages_per_node_s']:.2f} msg/node/s; CPU {r.cpu_s:.1f} s",
            flush=True,
        )
    return {"rows": rows}


def load_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    plan = {10: 5, 100: 3, 1000: 2}
    rows = []
    for profile in PROFILES:
        for n, runs in plan.items():
            row = point("swim", n, max(1, round(runs * scale)), loss=0.05, fail=1, profile=profile)
            rows.append(row)
            print(
                f"load swim/{profile} N={n}, 5% loss: {row['messages_per_node_s']:.2f} msg/node/s, "
                f"{row['bytes_per_node_s']:.0f} B/node/s; CPU {row['cpu_s']:.1f} s",
                flush=True,
            )
    spread = {}
    for profile in PROFILES:
        rates = [r["messages_per_node_s"] for r in rows if r["profile"] == profile]
        spread[profile] = max(rates) / min(rates) - 1
        print(f"load swim/{profile}: highest {spread[profile]:.0%} above the lowest", flush=True)
    return {"rows": rows, "spread": spread, "within_20_percent": spread["twlb"] <= 0.2}


def sequence_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    rows = []
    per_run: dict[str, list[dict[str, Any]]] = {}
    for n in (10, 32, 128):
        runs = max(1, round((10 if n < 128 else 4) * scale))
        for protocol in ("round-robin", "sequence-check", "consensus"):
            results = [
                run_scenario(Scenario(protocol, n, loss=0.01, fail=1, seed=1 + r))
                for r in range(runs)
            ]
            row = summarize(results)
            rows.append(row)
            per_run[f"{protocol}/{n}"] = [r.failures[0] for r in results]
            print(
                f"sequence {protocol} N={n}: first detection median "
                f"{row['first_detection_median_s']:.2f} s, agreement median "
                f"{row['agreement_median_s']:.2f} s, p99 {row['agreement_p99_s']:.2f} s; "
                f"declared before all suspected {row['declared_before_all_suspected']} of "
                f"{row['failures']}; false verdicts {row['false_positives']}",
                flush=True,
            )
        rr, sc = per_run[f"round-robin/{n}"], per_run[f"sequence-check/{n}"]
        earlier = sum(
            1
            for a, b in zip(rr, sc, strict=True)
            if b["first_detection_s"] < a["first_detection_s"]
        )
        print(f"sequence N={n}: sequence-check first on {earlier} of {len(rr)} runs", flush=True)
    return {"rows": rows, "runs": per_run}


def hour_section(scale: float, _: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for profile in PROFILES:
        row = point(
            "swim", 60, 1, loss=0.05, slow_fraction=0.05, fail=0, duration=3600.0, profile=profile
        )
        rows.append(row)
        print(
            f"hour swim/{profile} N=60 (3 slow, 0.2-0.8 s), 5% loss: {row['false_positives']} "
            f"false positives; CPU {row['cpu_s']:.1f} s",
            flush=True,
        )
    return {"rows": rows}


def scale_section(scale: float, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
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
        rows.append(row)
        print(
            f"scale swim N={n}: 60 simulated s in {r.cpu_s:.1f} s CPU ({r.wall_s:.1f} s wall, "
            f"{r.events} events, {row['messages_per_node_s']:.2f} msg/node/s); the node "
            f"killed at 10 s: {row['failure']}",
            flush=True,
        )
    return {"rows": rows}


def protocols_section(scale: float, args: argparse.Namespace) -> dict[str, Any]:
    sizes = [8, 16, 32, 64, 128]
    by_n = []
    for protocol in PROTOCOLS:
        for n in sizes:
            runs = max(1, round((2 if n <= 64 else 1) * scale))
            by_n.append(point(protocol, n, runs, loss=0.01, fail=1))
        print(f"protocols {protocol}: N = {sizes} done", flush=True)
    by_loss = []
    for protocol in PROTOCOLS:
        for loss in (0.0, 0.05, 0.1, 0.2):
            by_loss.append(point(protocol, 32, 1, loss=loss, fail=1))
    rounds = [r for r in by_n if r["protocol"] in ("round-robin", "binary-round-robin")]
    print("\n" + table(rounds, ROUNDS_COLUMNS))
    print("\n" + table(by_n, SUMMARY_COLUMNS))
    print("\n" + table(by_loss, SUMMARY_COLUMNS))
    plot(by_n, "nodes", args.plots / "gossip-vs-nodes.png", "gossip failure detection against N")
    plot(by_loss, "loss", args.plots / "gossip-vs-loss.png", "gossip failure detection (N = 32)")
    return {"by_nodes": by_n, "by_loss": by_loss}


SECTIONS: dict[str, Callable[[float, argparse.Namespace], dict[str, Any]]] = {
    "bound": bound_section,
    "slow": slow_section,
    "lag": lag_section,
    "fallback": fallback_section,
    "load": load_section,
    "sequence": sequence_section,
    "hour": hour_section,
    "scale": scale_section,
    "protocols": protocols_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/bench/gossip.json"))
    parser.add_argument("--plots", type=Path, default=Path("reports/bench"))
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke run)")
    parser.add_argument("--ten-thousand", action="store_true", help="also 10,000 swim nodes")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep the other sections already in --out"
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; one of {', '.join(SECTIONS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.plots.mkdir(parents=True, exist_ok=True)
    scale = 0.25 if args.quick else 1.0
    out: dict[str, Any] = (
        json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    )
    out.update(machine=platform.platform(), python=platform.python_version(), quick=args.quick)
    out.setdefault("commands", []).append(
        "python bench/gossip_bench.py --sections " + ",".join(chosen)
    )
    for name in chosen:
        started, cpu = time.perf_counter(), time.process_time()
        out[name] = SECTIONS[name](scale, args)
        out[name]["wall_s"] = time.perf_counter() - started
        out[name]["cpu_s"] = time.process_time() - cpu
        print(
            f"-- {name}: {out[name]['wall_s']:.0f} s wall, {out[name]['cpu_s']:.0f} s CPU",
            flush=True,
        )
        args.out.write_text(json.dumps(out, indent=1))  # what is done so far survives
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
