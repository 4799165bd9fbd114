"""Benchmark: can `twlb load` hold 2,000 req/s against one local benign backend?

Starts one `twlb backend --no-simulation`, runs the real command line
`twlb load --rate R --duration D --workers W` against it, and reports the achieved rate
(sends from the scheduled start to the last actual send: a generator that falls behind
scores below the target), how far sends ever lagged their schedule, verified answers,
latencies, and the CPU the generator and the backend used. The target: achieved within
2 % of the asked rate. Writes reports/bench/client_rate.json.

    .venv/bin/python bench/client_rate.py                      # 2,000 req/s for 20 s
    .venv/bin/python bench/client_rate.py --workers 2 --rate 3000
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import psutil
from client_support import REPORT_DIR, LoadProcess, machine, start_service, write_json
from rich.console import Console
from rich.table import Table

from twlb.options import FiniteFloat


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


@click.command()
@click.option("--rate", type=FiniteFloat(min=1.0), default=2000.0, show_default=True)
@click.option("--duration", type=FiniteFloat(min=1.0), default=20.0, show_default=True)
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option(
    "--mode", type=click.Choice(["basic", "resilient"]), default="resilient", show_default=True
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON path.")
def main(rate: float, duration: float, workers: int, mode: str, out: Path | None) -> None:
    console = Console()
    before = machine()
    with tempfile.TemporaryDirectory(prefix="twlb-client-rate-") as tmp:
        log_dir = Path(tmp)
        backend, url = start_service(
            "backend", "--no-simulation", "--log-level", "warning", log_dir=log_dir
        )
        try:
            backend_ps = psutil.Process(backend.pid)
            backend_cpu_before = _cpu_s(backend_ps)
            load = LoadProcess(
                [
                    "--url",
                    url,
                    "--rate",
                    str(rate),
                    "--duration",
                    str(duration),
                    "--workers",
                    str(workers),
                    "--mode",
                    mode,
                ],  # fmt: skip
                log_dir,
            ).start()
            run = load.wait(timeout=duration + 120.0)
            backend_cpu = _cpu_s(backend_ps) - backend_cpu_before
        finally:
            backend.stop()
    r = run.report
    achieved = r["achieved_rate"]
    error = abs(achieved - rate) / rate
    result = {
        "benchmark": "client_rate",
        "command": " ".join(sys.argv),
        "machine_before": before,
        "machine_after": machine(),
        "target_rate": rate,
        "achieved_rate": achieved,
        "rate_error": round(error, 5),
        "within_2_percent": error <= 0.02,
        "workers": workers,
        "mode": mode,
        "duration_s": r["duration_s"],
        "sent": r["sent"],
        "correct": r["correct"],
        "wrong": r["wrong"],
        "failed": r["failed"],
        "failed_by_reason": {k: v for k, v in r["failed_by_reason"].items() if v},
        "max_send_lag_ms": r["max_send_lag_ms"],
        "latency_ms": r["latency_ms"],
        "generator_cpu_s": round(run.cpu_s, 2),
        "generator_cpu_us_per_request": round(run.cpu_s / max(r["sent"], 1) * 1e6, 1),
        "backend_cpu_s": round(backend_cpu, 2),
        "backend_cpu_us_per_request": round(backend_cpu / max(r["sent"], 1) * 1e6, 1),
        "load_exit_status": run.exit_status,
    }
    path = write_json(out or REPORT_DIR / "client_rate.json", result)

    table = Table(title=f"twlb load at {rate:.0f} req/s for {duration:.0f} s ({workers} worker(s))")
    for col in ("figure", "value"):
        table.add_column(col)
    table.add_row("achieved rate", f"{achieved:.1f} req/s ({100 * error:.2f} % off target)")
    table.add_row("within 2 %", "yes" if error <= 0.02 else "NO")
    table.add_row("sent / correct / wrong / failed", f"{r['sent']} / {r['correct']} / "
                  f"{r['wrong']} / {r['failed']}")  # fmt: skip
    table.add_row("max send lag", f"{r['max_send_lag_ms']:.1f} ms")
    lat = r["latency_ms"]
    table.add_row("latency p50 / p99 / max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms")
    table.add_row("generator CPU / request", f"{result['generator_cpu_us_per_request']} µs")
    table.add_row("backend CPU / request", f"{result['backend_cpu_us_per_request']} µs")
    table.add_row("load average (1 min) before", f"{before['load_average'][0]}")
    console.print(table)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
