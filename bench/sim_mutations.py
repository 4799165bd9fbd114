"""The simulator's mutation score: is every deliberately broken variant found by the
CLI's own sweeps, within how many seeds, how often, and do the correct protocols pass
the very same seeds and faults?

Each row runs `twlb sim sweep` (or `twlb sim dht`) as a subprocess, exactly as a user
would, with `--output` JSON, once with `--bug VARIANT` and once (per protocol and
cluster size) without; the table gives the command, seeds to the first catch, the
catch rate, the checks and nemeses that caught it, and the correct protocol's runs,
violations and undecided runs over the same seeds.

    .venv/bin/python bench/sim_mutations.py --runs 300 --workers 2 \\
        --output docs/results/sim-mutations.json

The sweeps spread their seeds over the nemeses named (seed s takes the (s mod k)-th),
so each aiming nemesis gets a k-th of the seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: The aiming nemeses and the plain partitions, spread over the consensus sweeps' seeds.
AIMING = (
    "isolate-after-append,vote-crash,leader-crash,leader-isolate,leader-minority,"
    "leader-majority,leader-pause,clock,bridge,ring,partition,crash"
)
#: The hash table's: crashes (a coordinator's too, in the instant after it acknowledges),
#: partitions and clock faults, every episode drawing from all of them.
DHT_FAULTS = "crash,ack-crash,partition,bridge,ring,skew,clock"

CONSENSUS = ["--duration", "20", "--progress-within", "8", "--no-shrink"]


def consensus(algorithm: str, nodes: int, *nemesis: str) -> list[str]:
    return ["--algorithm", algorithm, "--nodes", str(nodes), "--nemesis", *nemesis, *CONSENSUS]


RAFT_5 = consensus("raft", 5, AIMING)
PBFT_4 = consensus("pbft", 4, "byzantine," + AIMING, "--byzantine-behaviours", "equivocate")
DHT = ["--nemesis", DHT_FAULTS, "--mix", "--episodes", "6"]
# (label, subcommand, its arguments, bug, what the variant breaks)
ROWS: list[tuple[str, str, list[str], str, str]] = [
    ("raft-5", "sweep", RAFT_5, "double-vote", "grants a vote to every candidate of a term"),
    (
        "raft-5",
        "sweep",
        RAFT_5,
        "commit-old-term",
        "commits an older term's entry by counting replicas, no election no-op (Figure 8)",
    ),
    ("raft-3", "sweep", consensus("raft", 3, AIMING), "commit-old-term", "the same, on 3 nodes"),
    (
        "raft-5",
        "sweep",
        RAFT_5,
        "vote-without-log-check",
        "grants votes without the log up-to-date check",
    ),
    ("raft-5", "sweep", RAFT_5, "forget-vote", "comes back from a crash without its vote"),
    ("paxos-5", "sweep", consensus("paxos", 5, AIMING), "no-phase1", "skips phase 1"),
    ("pbft-4", "sweep", PBFT_4, "weak-quorums", "prepares with f, commits with f+1"),
    ("pbft-4", "sweep", PBFT_4, "commit-2f", "commits with 2f matching commits, not 2f+1"),
    ("dht-strict", "dht", DHT, "stand-in-acks", "strict writes count stand-ins' acknowledgements"),
    (
        "dht-strict",
        "dht",
        DHT,
        "wall-clock-versions",
        "last writer wins by the coordinator's clock",
    ),
    ("dht-strict", "dht", DHT, "no-anti-entropy", "no Merkle-tree repair between replicas"),
]


def command(
    subcommand: str, args: list[str], runs: int, workers: int, bug: str | None
) -> list[str]:
    cmd = ["twlb", "sim", subcommand, *args, "--runs", str(runs), "--workers", str(workers)]
    return cmd + (["--bug", bug] if bug else [])


def run(cmd: list[str]) -> tuple[dict[str, Any], float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.json"
        argv = [sys.executable, "-m", "twlb", *cmd[1:], "--output", str(out)]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if done.returncode not in (0, 1, 3) or not out.exists():
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return json.loads(out.read_text()), wall


def caught_by(data: dict[str, Any]) -> dict[str, Any]:
    runs = data["runs"]
    bad = [r for r in runs if r["outcome"] == "violation"]
    first = bad[0]["seed"] if bad else None
    seed0 = runs[0]["seed"] if runs else 0
    return {
        "runs": len(runs),
        "caught": len(bad),
        "catch_rate": round(len(bad) / len(runs), 4) if runs else None,
        "first_catch_seed": first,
        "seeds_to_first_catch": None if first is None else first - seed0 + 1,
        "checks": dict(Counter(c for r in bad for c in r["failed_checks"])),
        "nemeses": dict(Counter(r["nemesis"] for r in bad)),
        "undecided": sum(r["outcome"] == "undecided" for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="Seeds per sweep (from 0).")
    parser.add_argument("--workers", type=int, default=2, help="Processes per sweep.")
    parser.add_argument("--only", default=None, help="Comma-separated bugs to run (default all).")
    parser.add_argument("--output", type=Path, default=Path("reports/sim-mutations.json"))
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    rows = [row for row in ROWS if only is None or row[3] in only]
    started = time.perf_counter()
    correct: dict[str, dict[str, Any]] = {}
    out_rows = []
    for label, sub, proto, bug, what in rows:
        cmd = command(sub, proto, args.runs, args.workers, bug)
        data, wall = run(cmd)
        row = {"protocol": label, "bug": bug, "breaks": what, "command": " ".join(cmd)}
        row |= caught_by(data) | {"wall_seconds": round(wall, 1)}
        if label not in correct:
            base = command(sub, proto, args.runs, args.workers, None)
            base_data, base_wall = run(base)
            summary = base_data["summary"]
            correct[label] = {
                "command": " ".join(base),
                "runs": summary["runs"],
                "violations": summary["violations"],
                "undecided": summary["undecided"],
                "failing_seeds": summary["failing_seeds"],
                "wall_seconds": round(base_wall, 1),
            }
        row["correct"] = correct[label]
        out_rows.append(row)
        print(
            f"{label:11} {bug:24} caught {row['caught']:3}/{row['runs']} "
            f"first at seed {row['first_catch_seed']}  by {row['checks']}  "
            f"correct: {correct[label]['violations']} violations, {correct[label]['undecided']} "
            f"undecided  ({wall:.0f}s)",
            flush=True,
        )
    total = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"runs_per_sweep": args.runs, "wall_seconds": round(total, 1), "rows": out_rows},
            indent=2,
        )
    )
    print()
    print(
        "| protocol | variant | seeds to first catch | caught | checks | correct protocol, same seeds |"
    )
    print("|---|---|---|---|---|---|")
    for row in out_rows:
        ok = row["correct"]
        checks = ", ".join(sorted(row["checks"]))
        print(
            f"| {row['protocol']} | `{row['bug']}` | {row['seeds_to_first_catch']} | "
            f"{row['caught']} of {row['runs']} ({100 * (row['catch_rate'] or 0):.1f}%) | {checks} | "
            f"{ok['violations']} violations, {ok['undecided']} undecided in {ok['runs']} |"
        )
    print(f"\nwall time {total:.0f} s; results: {args.output}")


if __name__ == "__main__":
    main()
