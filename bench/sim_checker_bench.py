"""Time per history of the linearizability checker on every conformance history
(`../shared/conformance/`: jepsen-etcd logs with Porcupine's verdicts, kv EDN files),
parse and check timed apart (CPU seconds of this process: the machine is shared), with
the agreement with the known verdict beside each.

    .venv/bin/python bench/sim_checker_bench.py --output docs/results/sim-checker-bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from twlb.sim.checker import check_history
from twlb.sim.history import read_history

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conformance", type=Path, default=REPO.parent / "shared" / "conformance")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Best of this many checks per history."
    )
    parser.add_argument("--output", type=Path, default=Path("reports/sim-checker-bench.json"))
    args = parser.parse_args()
    root = args.conformance
    if not root.is_dir():
        sys.exit(f"conformance histories not found at {root} (use --conformance)")
    verdicts = dict(
        line.split()
        for line in (root / "jepsen-etcd" / "verdicts.txt").read_text().splitlines()
        if line.strip()
    )
    cases = [
        (p, "register", verdicts[p.name] == "true")
        for p in sorted((root / "jepsen-etcd").glob("*.log"))
    ]
    cases += [(p, "kv", p.stem.endswith("-ok")) for p in sorted((root / "kv").glob("*.txt"))]
    rows = []
    for path, model, expected in cases:
        t0 = time.process_time()
        history = read_history(path)
        parse_s = time.process_time() - t0
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.process_time()
            verdict = check_history(history, model, shortest_prefix=False)
            best = min(best, time.process_time() - t0)
        t0 = time.process_time()
        with_prefix = check_history(history, model)
        prefix_s = time.process_time() - t0
        rows.append(
            {
                "file": f"{path.parent.name}/{path.name}",
                "model": model,
                "expected": expected,
                "linearizable": verdict.linearizable,
                "agrees": verdict.linearizable == expected,
                "operations": sum(k.operations for k in verdict.keys),
                "states": sum(k.states for k in verdict.keys),
                "parse_s": round(parse_s, 5),
                "check_s": round(best, 5),
                "check_with_shortest_prefix_s": round(prefix_s, 5),
                "shortest_prefix_events": len(with_prefix.prefix),
            }
        )
    times = [r["check_s"] for r in rows]
    summary = {
        "histories": len(rows),
        "agree": sum(r["agrees"] for r in rows),
        "check_s_median": statistics.median(times),
        "check_s_max": max(times),
        "check_s_total": round(sum(times), 4),
        "slowest": max(rows, key=lambda r: r["check_s"])["file"],
    }
    for r in sorted(rows, key=lambda r: -r["check_s"])[:5]:
        print(
            f"{r['file']:28s} {r['operations']:4d} ops {r['states']:7d} states {r['check_s'] * 1000:8.1f} ms"
        )
    print(
        f"{summary['agree']}/{summary['histories']} agree with the known verdicts; check time median "
        f"{summary['check_s_median'] * 1000:.2f} ms, max {summary['check_s_max'] * 1000:.1f} ms ({summary['slowest']}), "
        f"total {summary['check_s_total']:.2f} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, "histories": rows}, indent=2))
    print(f"wrote {args.output}")
    sys.exit(0 if summary["agree"] == summary["histories"] else 1)


if __name__ == "__main__":
    main()
