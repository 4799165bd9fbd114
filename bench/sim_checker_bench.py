"""The linearizability checker on every conformance history (tests/data/jepsen/: Jepsen
etcd logs and Porcupine's 1-, 10- and 50-client kv histories, with known verdicts):
agreement, time, configurations and memory; the same search without the observer
reduction (Porcupine's search, the reference) side by side in the same run; the peak
memory of a `twlb sim check` process on the hardest history; a long history (100,000
operations, nothing concurrent); and a history built to explode the search, checked with
the default memory budget, stopping with exit 3.

    .venv/bin/python bench/sim_checker_bench.py --output docs/results/sim-checker-bench.json

Times are CPU seconds of this process (best of --repeats), the fair figure on a shared
machine; the whole set's time includes reading the files. Peak memory is the checker's
own accounting of its structures and, for whole `twlb sim check` processes, the peak
resident set each reports of itself, next to that of a process checking a 4-event
history (the interpreter and imports alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twlb.processes.managed import twlb_argv
from twlb.sim.checker import DEFAULT_MAX_MEMORY, check_history, format_bytes
from twlb.sim.history import EventType, History, HistoryEvent, read_history

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "jepsen"
#: The whole conformance set, read and checked, within this many seconds (issue's bar).
TARGET_TOTAL_S = 10.0


def cases() -> list[tuple[Path, str, bool]]:
    verdicts = dict(
        line.split()
        for line in (DATA / "jepsen-etcd" / "verdicts.txt").read_text().splitlines()
        if line.strip()
    )
    out = [
        (p, "register", verdicts[p.name] == "true")
        for p in sorted((DATA / "jepsen-etcd").glob("etcd_*.log"))
    ]
    return out + [(p, "kv", p.stem.endswith("-ok")) for p in sorted((DATA / "kv").glob("*.txt"))]


def best_cpu(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        result = fn()
        best = min(best, time.process_time() - t0)
    return best, result


def measure_process(argv: list[str], limit_s: float) -> dict:
    """Run `twlb sim check ... --json`: its exit code, wall and CPU seconds, and the peak
    resident memory it reports of itself (VmHWM; wait4's maximum would include what this
    process held when it forked the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise TimeoutError(f"{argv} still running after {limit_s} s") from None
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(stdout)
    return {
        "exit_code": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_bytes": report["process_peak_rss_bytes"],
        "budgeted_peak_bytes": report.get("peak_memory_bytes")
        or (report.get("progress") or {}).get("peak_memory_bytes"),
        "undecided": report.get("undecided"),
        "stderr_last_line": stderr.strip().splitlines()[-1] if stderr.strip() else "",
    }


def exploding_history(writers: int) -> History:
    """`writers` concurrent writes, then a read of a value none wrote: every subset of
    the writes in every state must be tried before the verdict."""
    events = [HistoryEvent(i, EventType.INVOKE, "write", i, key="x") for i in range(writers)]
    events += [HistoryEvent(i, EventType.OK, "write", i, key="x") for i in range(writers)]
    events += [
        HistoryEvent(writers, EventType.INVOKE, "read", None, key="x"),
        HistoryEvent(writers, EventType.OK, "read", -1, key="x"),
    ]
    return History(events)


def long_history(rounds: int) -> History:
    """Five clients taking turns to write a new value and read it back: 4 x `rounds`
    events, linearizable, nothing concurrent."""
    events = []
    for i in range(rounds):
        p = i % 5
        events += [
            HistoryEvent(p, EventType.INVOKE, "write", i, key="x"),
            HistoryEvent(p, EventType.OK, "write", i, key="x"),
            HistoryEvent(p, EventType.INVOKE, "read", None, key="x"),
            HistoryEvent(p, EventType.OK, "read", i, key="x"),
        ]
    return History(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Best of this many checks.")
    parser.add_argument("--output", type=Path, default=Path("reports/sim-checker-bench.json"))
    parser.add_argument(
        "--explode-limit-s",
        type=float,
        default=1800.0,
        help="Fail if the exploding history has not stopped after this many seconds.",
    )
    args = parser.parse_args()
    rows = []
    total_s = 0.0
    for path, model, expected in cases():
        t0 = time.process_time()
        history = read_history(path)
        parse_s = time.process_time() - t0
        check_s, verdict = best_cpu(lambda h=history, m=model: check_history(h, m), args.repeats)
        ref_s, reference = best_cpu(
            lambda h=history, m=model: check_history(h, m, reduce_observers=False), args.repeats
        )
        total_s += parse_s + check_s
        rows.append(
            {
                "file": f"{path.parent.name}/{path.name}",
                "model": model,
                "expected": expected,
                "linearizable": verdict.linearizable,
                "agrees": verdict.linearizable == expected,
                "reference_agrees": reference.linearizable == expected,
                "operations": sum(k.operations for k in verdict.keys),
                "keys": len(verdict.keys),
                "states": sum(k.states for k in verdict.keys),
                "reference_states": sum(k.states for k in reference.keys),
                "parse_s": round(parse_s, 5),
                "check_s": round(check_s, 5),
                "reference_check_s": round(ref_s, 5),
                "search_memory_bytes": verdict.search_memory,
                "failing_prefix_events": len(verdict.prefix),
            }
        )
        print(
            f"{rows[-1]['file']:28s} {'agrees' if rows[-1]['agrees'] else 'DISAGREES':9s} "
            f"{rows[-1]['states']:8d} states {check_s * 1000:8.1f} ms  "
            f"(reference {rows[-1]['reference_states']:8d} states {ref_s * 1000:8.1f} ms)",
            flush=True,
        )
    long = long_history(50_000)
    long_s, long_verdict = best_cpu(lambda: check_history(long, "register"), args.repeats)
    long_row = {
        "operations": sum(k.operations for k in long_verdict.keys),
        "linearizable": long_verdict.linearizable,
        "states": sum(k.states for k in long_verdict.keys),
        "check_s": round(long_s, 4),
        "search_memory_bytes": long_verdict.search_memory,
    }
    print(
        f"long sequential history: {long_row['operations']} operations in {long_s:.2f} s, "
        f"{format_bytes(long_verdict.search_memory)}",
        flush=True,
    )
    hardest = max(rows, key=lambda r: r["check_s"])
    model = hardest["model"]
    with tempfile.TemporaryDirectory(prefix="twlb-checker-bench-") as tmp:
        tiny = Path(tmp) / "tiny.edn"
        tiny.write_text(
            "{:process 0, :type :invoke, :f :write, :value 1}\n"
            "{:process 0, :type :ok, :f :write, :value 1}\n"
            "{:process 1, :type :invoke, :f :read, :value nil}\n"
            "{:process 1, :type :ok, :f :read, :value 1}\n"
        )
        baseline = measure_process(twlb_argv("sim", "check", str(tiny)), 120)
        hard = measure_process(
            twlb_argv("sim", "check", str(DATA / hardest["file"]), "--model", model), 300
        )
        explode = Path(tmp) / "explode.edn"
        exploding_history(40).write_edn(explode)
        print(
            f"exploding history (40 concurrent writes), default budget "
            f"{format_bytes(DEFAULT_MAX_MEMORY)} ...",
            flush=True,
        )
        exploded = measure_process(
            twlb_argv("sim", "check", str(explode), "--model", "register"), args.explode_limit_s
        )
    times = [r["check_s"] for r in rows]
    summary = {
        "histories": len(rows),
        "agree": sum(r["agrees"] for r in rows),
        "reference_agree": sum(r["reference_agrees"] for r in rows),
        "total_read_and_check_s": round(total_s, 3),
        "target_total_s": TARGET_TOTAL_S,
        "target_met": total_s < TARGET_TOTAL_S,
        "check_s_total": round(sum(times), 4),
        "reference_check_s_total": round(sum(r["reference_check_s"] for r in rows), 4),
        "states_total": sum(r["states"] for r in rows),
        "reference_states_total": sum(r["reference_states"] for r in rows),
        "check_s_median": statistics.median(times),
        "check_s_max": max(times),
        "slowest": hardest["file"],
        "kv_50_clients": {r["file"]: r for r in rows if "/c50-" in r["file"]},
        "long_sequential_history": long_row,
        "hardest_history_process": {"file": hardest["file"], **hard},
        "baseline_process": baseline,
        "exploding_history": {
            "writers": 40,
            "budget_bytes": DEFAULT_MAX_MEMORY,
            **exploded,
        },
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    print(
        f"{summary['agree']}/{summary['histories']} agree with the known verdicts "
        f"(reference {summary['reference_agree']}); read and checked in "
        f"{total_s:.2f} CPU s (target < {TARGET_TOTAL_S:g} s: "
        f"{'met' if summary['target_met'] else 'MISSED'}); checks {sum(times):.2f} s, "
        f"{summary['states_total']:,} configurations; the reference "
        f"{summary['reference_check_s_total']:.2f} s, {summary['reference_states_total']:,}"
    )
    print(
        f"hardest {hardest['file']}: {hardest['check_s'] * 1000:.0f} ms, "
        f"{format_bytes(hardest['search_memory_bytes'])} of search structures, process peak RSS "
        f"{format_bytes(hard['peak_rss_bytes'])} (a 4-event check: "
        f"{format_bytes(baseline['peak_rss_bytes'])})"
    )
    print(
        f"exploding history: exit {exploded['exit_code']} after {exploded['wall_s']:.0f} s "
        f"({exploded['cpu_s']:.0f} CPU s), peak RSS {format_bytes(exploded['peak_rss_bytes'])}"
        f" for a {format_bytes(DEFAULT_MAX_MEMORY)} budget"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, "histories": rows}, indent=2))
    print(f"wrote {args.output}")
    ok = summary["agree"] == summary["histories"] and exploded["exit_code"] == 3
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
