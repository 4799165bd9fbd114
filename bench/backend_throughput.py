"""Benchmark: a benign backend node's /work?rounds=1 throughput against a bare uvicorn app.

Both servers run side by side (one uvicorn worker each, uvloop + httptools, access log
off); wrk drives one at a time from its own process, alternating for several rounds, and
the medians are compared. The bare app is a minimal Starlette route answering the same
JSON (it computes the same digest), so the ratio is what the node's fault, simulation
and metrics layers cost. Writes reports/bench/backend_throughput.json.

    .venv/bin/python bench/backend_throughput.py            # simulation on, as deployed
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import orjson
import psutil
from rich.console import Console
from rich.table import Table
from twlb.backend.cli import server_config

from twlb.procs import ManagedProcess, free_port, twlb_argv
from twlb.work import digest

WORK_PATH = "/work?key=bench&rounds=1"
BARE = "bare uvicorn"
BACKEND = "twlb backend"


def bare_app() -> object:
    """The comparison: one Starlette route, same query, same digest, same JSON, nothing else."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def work(request: Request) -> Response:
        key = request.query_params["key"]
        rounds = int(request.query_params.get("rounds", "1"))
        body = {"node": "bare", "key": key, "rounds": rounds, "digest": digest(key, rounds)}
        return Response(orjson.dumps(body), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/work", work), Route("/healthz", healthz)])


@dataclass
class WrkRun:
    """One wrk run against one server, with the server's CPU time per answered request."""

    server: str
    round: int
    requests_per_s: float
    requests: int
    non_2xx: int
    socket_errors: int
    latency_avg_ms: float
    server_cpu_us_per_request: float = float("nan")


def _latency_ms(text: str) -> float:
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\b", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(
    server: str, round_: int, url: str, duration_s: int, connections: int, threads: int
) -> WrkRun:
    """Run wrk once (bounded by its own duration plus a margin) and parse its summary."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", url]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 30, check=True
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkRun(
        server=server,
        round=round_,
        requests_per_s=float(rps.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        latency_avg_ms=_latency_ms(out),
    )


def measure(
    server: str,
    proc: ManagedProcess,
    round_: int,
    url: str,
    duration: int,
    conns: int,
    threads: int,
) -> WrkRun:
    """A wrk run plus the CPU the server spent on it (robust to other load on the machine)."""
    ps = psutil.Process(proc.pid)
    before = sum(ps.cpu_times()[:2])
    run = run_wrk(server, round_, url, duration, conns, threads)
    run.server_cpu_us_per_request = (sum(ps.cpu_times()[:2]) - before) / max(run.requests, 1) * 1e6
    return run


@click.group(invoke_without_command=True)
@click.option("--rounds", default=5, type=click.IntRange(1, 20), show_default=True)
@click.option(
    "--duration",
    default=4,
    type=click.IntRange(1, 60),
    show_default=True,
    help="Seconds per wrk run.",
)
@click.option("--connections", default=32, type=click.IntRange(1, 1024), show_default=True)
@click.option("--threads", default=1, type=click.IntRange(1, 8), show_default=True)
@click.option(
    "--simulation/--no-simulation",
    default=True,
    show_default=True,
    help="Run the backend with its node simulation (on, as deployed).",
)
@click.option(
    "--out",
    default="reports/bench/backend_throughput.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
)
@click.pass_context
def main(
    ctx: click.Context,
    rounds: int,
    duration: int,
    connections: int,
    threads: int,
    simulation: bool,
    out: Path,
) -> None:
    """Compare a benign backend's throughput with a bare uvicorn app, side by side."""
    if ctx.invoked_subcommand is not None:
        return
    if shutil.which("wrk") is None:
        raise click.UsageError("wrk is not installed (Debian: apt-get install -y wrk)")
    bare_port, backend_port = free_port(), free_port()
    backend_args = ["--node-id", "bench", "--seed", "0", "--log-level", "warning"]
    if not simulation:
        backend_args.append("--no-simulation")
    procs = {
        BARE: ManagedProcess([sys.executable, __file__, "serve-bare", "--port", str(bare_port)]),
        BACKEND: ManagedProcess(
            twlb_argv("backend", "--host", "127.0.0.1", "--port", str(backend_port), *backend_args)
        ),
    }
    urls = {BARE: f"http://127.0.0.1:{bare_port}", BACKEND: f"http://127.0.0.1:{backend_port}"}
    load_before = os.getloadavg()
    runs: list[WrkRun] = []
    try:
        for proc in procs.values():
            proc.start()
        for name, proc in procs.items():
            proc.wait_ready(urls[name] + "/healthz")
        for name in procs:  # warm-up, not recorded
            run_wrk(name, 0, urls[name] + WORK_PATH, 2, connections, threads)
        for r in range(1, rounds + 1):
            # Alternate the order so drift (other load on the machine) hits both sides alike.
            order = [BARE, BACKEND] if r % 2 else [BACKEND, BARE]
            for name in order:
                runs.append(
                    measure(
                        name, procs[name], r, urls[name] + WORK_PATH, duration, connections, threads
                    )
                )
    finally:
        for proc in procs.values():
            proc.stop()

    def of(name: str, attr: str) -> list[float]:
        return [getattr(x, attr) for x in runs if x.server == name]

    median = {name: statistics.median(of(name, "requests_per_s")) for name in urls}
    cpu = {name: statistics.median(of(name, "server_cpu_us_per_request")) for name in urls}
    # Each round's two runs are back to back, so their ratio is the least disturbed figure.
    paired = [
        b / a
        for a, b in zip(of(BARE, "requests_per_s"), of(BACKEND, "requests_per_s"), strict=True)
    ]
    ratio = statistics.median(paired)
    table = Table(title=f"/work?rounds=1, wrk -t{threads} -c{connections} -d{duration}s")
    columns = (
        "server",
        "round",
        "req/s",
        "requests",
        "non-2xx",
        "socket err",
        "avg ms",
        "CPU us/req",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "server" else "right")
    for x in runs:
        table.add_row(
            x.server,
            str(x.round),
            f"{x.requests_per_s:,.0f}",
            str(x.requests),
            str(x.non_2xx),
            str(x.socket_errors),
            f"{x.latency_avg_ms:.2f}",
            f"{x.server_cpu_us_per_request:.0f}",
        )
    console = Console(width=120)
    console.print(table)
    console.print(
        f"median req/s: bare {median[BARE]:,.0f}, backend {median[BACKEND]:,.0f}; "
        f"median of paired ratios {ratio:.3f} (target >= 0.7); "
        f"server CPU per request: bare {cpu[BARE]:.0f} us, backend {cpu[BACKEND]:.0f} us; "
        f"simulation {'on' if simulation else 'off'}; load average {load_before[0]:.1f}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "backend_throughput",
        "path": WORK_PATH,
        "simulation": simulation,
        "wrk": {
            "threads": threads,
            "connections": connections,
            "duration_s": duration,
            "rounds": rounds,
        },
        "bare_requests_per_s": median[BARE],
        "backend_requests_per_s": median[BACKEND],
        "ratio": ratio,
        "ratio_of_medians": median[BACKEND] / median[BARE],
        "paired_ratios": paired,
        "target_ratio": 0.7,
        "meets_target": ratio >= 0.7,
        "server_cpu_us_per_request": {"bare": cpu[BARE], "backend": cpu[BACKEND]},
        "runs": [asdict(x) for x in runs],
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


@main.command("serve-bare")
@click.option("--host", default="127.0.0.1")
@click.option("--port", required=True, type=click.IntRange(1, 65535))
def serve_bare(host: str, port: int) -> None:
    """Serve the bare comparison app (started by the benchmark itself)."""
    import uvicorn

    # The same server settings `twlb backend` uses, so only the app differs.
    uvicorn.Server(server_config(bare_app(), host, port, "warning")).run()


if __name__ == "__main__":
    main()
