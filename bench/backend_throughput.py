"""Benchmark: a benign backend node's /work?rounds=1 throughput against bare uvicorn apps.

Three servers run side by side (one uvicorn worker each, uvloop + httptools, access log
off): the backend, a bare ASGI callable and a minimal Starlette route, both bare ones
answering the same JSON (they compute the same digest). wrk drives one server at a
time from its own process, in rounds whose order rotates; each round's runs are back to
back, so the median of per-round ratios is the figure least disturbed by other load.
The headline ratio is against the bare ASGI callable, the thinnest endpoint uvicorn can
serve; the ratio against Starlette is reported beside it. The server's CPU time per
request is measured too (robust on a busy machine). Writes
reports/bench/backend_throughput.json.

wrk keeps 128 connections open, not 32: a closed loop of N connections completes at
most N / latency requests per second, and the simulated node deliberately answers
after about 1.7 ms (seed 0) where the bare apps answer at once. At 32 connections that
simulated service time, not the fault and simulation layer's cost, sets the backend's
rate (32 / 3 ms is about 11,000 req/s, below what the bare app serves on a quiet
machine); 128 connections leave four times that headroom, so both servers are
measured at what they can serve.

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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import click
import orjson
import psutil
from rich.console import Console
from rich.table import Table
from twlb.backend.server import server_config
from twlb.backend.settings import BackendSettings
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.work import digest

WORK_PATH = "/work?key=bench&rounds=1"
BARE_ASGI = "bare ASGI"
BARE_STARLETTE = "bare Starlette"
BACKEND = "twlb backend"
JSON_HEADERS = [(b"content-type", b"application/json")]


def _work_json(query: dict[str, str]) -> bytes:
    key, rounds = query["key"], int(query.get("rounds", "1"))
    return orjson.dumps(
        {"node": "bare", "key": key, "rounds": rounds, "digest": digest(key, rounds)}
    )


def bare_asgi_app() -> Callable[..., Awaitable[None]]:
    """The thinnest comparison: one ASGI callable, same query, digest and JSON, nothing else."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/work":
            body = _work_json(dict(parse_qsl(scope["query_string"].decode("latin-1"))))
        else:
            body = b'{"status":"ok"}'
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def bare_starlette_app() -> Any:
    """A minimal Starlette app: one route answering the same JSON, plus a health route."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def work(request: Request) -> Response:
        return Response(_work_json(dict(request.query_params)), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/work", work), Route("/healthz", healthz)])


BARE_APPS = {"asgi": bare_asgi_app, "starlette": bare_starlette_app}


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

    @property
    def ok_per_s(self) -> float:
        """Answers a second that were 2xx (wrk counts every answer in its rate)."""
        return self.requests_per_s * (self.requests - self.non_2xx) / max(self.requests, 1)


def wrk_options(rounds: int, duration: int, connections: int) -> Callable[[Any], Any]:
    """The options of every benchmark driven by wrk: how many rounds, how long each run,
    how many connections (each benchmark with its defaults)."""

    def apply(command: Any) -> Any:
        for option in (
            click.option("--connections", default=connections, type=click.IntRange(1, 1024),
                         show_default=True),
            click.option("--duration", default=duration, type=click.IntRange(1, 60),
                         show_default=True, help="Seconds per wrk run."),
            click.option("--rounds", default=rounds, type=click.IntRange(1, 20),
                         show_default=True),
        ):  # fmt: skip
            command = option(command)
        return command

    return apply


def report_option(name: str) -> Callable[[Any], Any]:
    """`--out`: where a benchmark writes its JSON report (default reports/bench/<name>)."""
    return click.option(
        "--out",
        default=Path("reports/bench") / name,
        type=click.Path(dir_okay=False, path_type=Path),
        show_default=True,
    )


@contextmanager
def running(
    procs: Mapping[str, ManagedProcess], ready: Mapping[str, str], timeout: float = 60.0
) -> Iterator[None]:
    """Every process started and answering its `ready` URL; every one stopped (by its pid)
    on the way out, whatever happened."""
    try:
        for proc in procs.values():
            proc.start()
        for name, url in ready.items():
            procs[name].wait_ready(url, timeout=timeout)
        yield
    finally:
        for proc in procs.values():
            proc.stop()


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
@click.option("--rounds", default=9, type=click.IntRange(1, 30), show_default=True)
@click.option(
    "--duration",
    default=2,
    type=click.IntRange(1, 60),
    show_default=True,
    help="Seconds per wrk run.",
)
@click.option("--connections", default=128, type=click.IntRange(1, 1024), show_default=True)
@click.option("--threads", default=1, type=click.IntRange(1, 8), show_default=True)
@click.option(
    "--simulation/--no-simulation",
    default=True,
    show_default=True,
    help="Run the backend with its node simulation (on, as deployed).",
)
@report_option("backend_throughput.json")
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
    ports: list[int] = []
    while len(ports) < 3:
        if (port := free_port()) not in ports:
            ports.append(port)
    backend_args = ["--node-id", "bench", "--seed", "0", "--log-level", "warning"]
    if not simulation:
        backend_args.append("--no-simulation")

    def bare(flavour: str, port: int) -> ManagedProcess:
        return ManagedProcess(
            [sys.executable, __file__, "serve-bare", "--flavour", flavour, "--port", str(port)]
        )

    procs = {
        BARE_ASGI: bare("asgi", ports[0]),
        BARE_STARLETTE: bare("starlette", ports[1]),
        BACKEND: ManagedProcess(
            twlb_argv("backend", "--host", "127.0.0.1", "--port", str(ports[2]), *backend_args)
        ),
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(procs, ports, strict=True)}
    names = list(procs)
    load_before = os.getloadavg()
    runs: list[WrkRun] = []
    with running(procs, {name: urls[name] + "/healthz" for name in names}, timeout=20.0):
        for name in names:  # warm-up, not recorded
            run_wrk(name, 0, urls[name] + WORK_PATH, 2, connections, threads)
        for r in range(1, rounds + 1):
            # Rotate the order so drift (other load on the machine) hits every server alike.
            shift = (r - 1) % len(names)
            for name in names[shift:] + names[:shift]:
                runs.append(
                    measure(
                        name, procs[name], r, urls[name] + WORK_PATH, duration, connections, threads
                    )
                )

    def of(name: str, attr: str) -> list[float]:
        return [getattr(x, attr) for x in runs if x.server == name]

    median = {name: statistics.median(of(name, "requests_per_s")) for name in names}
    cpu = {name: statistics.median(of(name, "server_cpu_us_per_request")) for name in names}

    def paired(bare_name: str) -> list[float]:
        # A round's runs are back to back, so their ratio is the least disturbed figure.
        pairs = zip(of(bare_name, "requests_per_s"), of(BACKEND, "requests_per_s"), strict=True)
        return [backend / bare for bare, backend in pairs]

    ratios = {name: paired(name) for name in (BARE_ASGI, BARE_STARLETTE)}
    # Requests per second of server CPU: the throughput ratio a dedicated core would show,
    # and far steadier than wall-clock rates on a shared machine.
    cpu_ratio = cpu[BARE_ASGI] / cpu[BACKEND]
    ratio = statistics.median(ratios[BARE_ASGI])
    ratio_starlette = statistics.median(ratios[BARE_STARLETTE])
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
        "median req/s: "
        + ", ".join(f"{name} {median[name]:,.0f}" for name in names)
        + "\nserver CPU per request: "
        + ", ".join(f"{name} {cpu[name]:.0f} us" for name in names)
        + f"\nbackend / bare ASGI: {ratio:.3f} (target >= 0.7); "
        f"backend / bare Starlette: {ratio_starlette:.3f} (medians of per-round ratios)"
        f"\nper server CPU second, backend / bare ASGI: {cpu_ratio:.3f}"
        f"\nsimulation {'on' if simulation else 'off'}; load average {load_before[0]:.1f}"
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
        "requests_per_s": median,
        "bare_requests_per_s": median[BARE_ASGI],
        "backend_requests_per_s": median[BACKEND],
        "ratio": ratio,
        "ratio_vs_bare_starlette": ratio_starlette,
        "paired_ratios": ratios,
        "target_ratio": 0.7,
        "meets_target": ratio >= 0.7,
        "server_cpu_us_per_request": cpu,
        "ratio_per_cpu_second": cpu_ratio,
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
@click.option("--flavour", type=click.Choice(sorted(BARE_APPS)), required=True)
def serve_bare(host: str, port: int, flavour: str) -> None:
    """Serve a bare comparison app (started by the benchmark itself)."""
    import uvicorn

    # The same server settings `twlb backend` uses, so only the app differs.
    limits = BackendSettings().head_limits
    uvicorn.Server(server_config(BARE_APPS[flavour](), host, port, "warning", limits)).run()


if __name__ == "__main__":
    main()
