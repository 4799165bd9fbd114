"""Benchmark: the event-loop time one /metrics scrape costs a balancer of 1,000 backends.

Each build measured (this one and, with `--reference-python`, another installed in a
venv of its own: the code before a change) runs this file as a child process with its
own interpreter. The child builds that build's balancer app with BACKENDS backends in
memory (an upstream that answers at once: no sockets, so no other process's load is in
the figures), gives every backend traffic (each try outcome and latency bucket) and a
trust update (the feature gauges), freezes the fleet's objects out of the cyclic
collector (as the process does once its fleet has settled), then scrapes `/metrics`
through the app's own request path (`BalancerApp.call_api`, as the HTTP server calls it)
`--scrapes` times on a uvloop event loop. A probe task on the same loop wakes at every turn meanwhile. Per
scrape:

- loop time: the CPU time of the loop's thread from the request to the answer (the
  balancer is one thread: this is what the scrape took from everything else, whether
  in one piece or in slices);
- stall: the most CPU time the loop spent between two of the probe's turns, what the
  scrape held every other connection up at once (CPU time: on a busy machine wall time
  also holds the time the process was not running);
- the exposition's size.

    .venv/bin/python bench/metrics_scrape.py --reference-python /tmp/ref-venv/bin/python

Printed and written to reports/bench/metrics_scrape.json.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

#: Outcomes and latencies each backend's counters are given (every bucket reached).
LATENCIES_S = (0.0004, 0.0008, 0.002, 0.004, 0.008, 0.02, 0.04, 0.08, 0.2, 0.4, 0.8, 2.0, 4.0, 8.0, 20.0)  # fmt: skip


def child(backends: int, scrapes: int) -> dict[str, Any]:
    """Measure the build this interpreter imports (run in a child process)."""
    import uvloop
    from twlb.balancer.app import BalancerApp
    from twlb.balancer.settings import BalancerSettings
    from twlb.balancer.upstream import UpstreamResponse

    from twlb.outcome import Outcome

    class Instant:
        def __init__(self, url: str) -> None:
            self.url = url

        async def request(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
            return UpstreamResponse(200, [], b"{}")

        def close(self) -> None:
            pass

    urls = tuple(f"http://10.{i // 250}.{i % 250}.1:8000" for i in range(backends))
    settings = BalancerSettings(backends=urls, model="heuristic", audit_fraction=0.0)
    app = BalancerApp(settings, transport=Instant, health_transport=Instant)
    balancer = app.balancer
    now = balancer.clock()
    for url in urls:
        counters = balancer.metrics.backend(url)
        window = balancer.windows[url]
        for outcome in Outcome:
            for latency in LATENCIES_S:
                counters.observe(outcome, latency)
                window.record_request(now, outcome, latency)
    logging.disable(logging.CRITICAL)  # the trust events of the setup
    balancer.update_trust(now)
    # As the process does once its fleet has settled (services/balancer/cli.py, refreeze):
    # the fleet's objects out of the cyclic collector's generations.
    gc.collect()
    gc.freeze()

    async def run() -> list[dict[str, float]]:
        loop = asyncio.get_running_loop()
        rows = []
        for _ in range(scrapes):
            done = loop.create_future()
            gaps = [0.0]

            async def probe(done: asyncio.Future = done, gaps: list[float] = gaps) -> None:
                # In CPU time of this thread: on a busy machine a gap in wall time also
                # holds the time the process was not running at all.
                last = time.thread_time()
                while not done.done():
                    await asyncio.sleep(0)
                    t = time.thread_time()
                    gaps.append(t - last)
                    last = t

            task = loop.create_task(probe())
            await asyncio.sleep(0)  # the probe is under way
            cpu0 = time.thread_time()
            reply = await app.call_api(
                "GET", b"/metrics", b"", [(b"host", b"bench")], ("127.0.0.1", 1), None, b""
            )
            cpu = time.thread_time() - cpu0
            done.set_result(None)
            await task
            assert reply.status == 200, reply.status
            rows.append(
                {"loop_ms": cpu * 1000, "stall_ms": max(gaps) * 1000, "bytes": len(reply.body)}
            )
            await asyncio.sleep(1.1)  # past any reuse of the last rendering
        return rows

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rows = runner.run(run())
    return {
        "backends": backends,
        "exposition_bytes": rows[-1]["bytes"],
        "loop_ms": [round(r["loop_ms"], 2) for r in rows],
        "stall_ms": [round(r["stall_ms"], 2) for r in rows],
    }


def summary(result: dict[str, Any]) -> dict[str, float]:
    return {
        "loop_ms_median": round(statistics.median(result["loop_ms"]), 2),
        "loop_ms_max": round(max(result["loop_ms"]), 2),
        "stall_ms_median": round(statistics.median(result["stall_ms"]), 2),
        "stall_ms_max": round(max(result["stall_ms"]), 2),
    }


@click.group(invoke_without_command=True)
@click.option("--backends", default=1000, type=click.IntRange(1, 5000), show_default=True)
@click.option("--scrapes", default=10, type=click.IntRange(1, 100), show_default=True)
@click.option("--reference-python", default=None, help="Interpreter of another build to measure beside this one.")  # fmt: skip
@click.option("--reference-name", default="reference", show_default=True, help="What the reference build is (a commit, say).")  # fmt: skip
@click.option("--out", default=Path("reports/bench/metrics_scrape.json"), type=click.Path(path_type=Path), show_default=True)  # fmt: skip
@click.pass_context
def main(
    ctx: click.Context,
    backends: int,
    scrapes: int,
    reference_python: str | None,
    reference_name: str,
    out: Path,
) -> None:
    """Loop time and stall per /metrics scrape at BACKENDS backends, build by build."""
    if ctx.invoked_subcommand is not None:
        return
    from client_support import machine, write_json
    from rich.console import Console
    from rich.table import Table

    builds = [("this build", sys.executable)]
    if reference_python is not None:
        builds.append((reference_name, reference_python))
    results = []
    console = Console()
    for name, python in builds:
        console.print(f"{name}: {scrapes} scrapes at {backends} backends ({python})")
        done = subprocess.run(
            [python, "-P", __file__, "child", "--backends", str(backends), "--scrapes", str(scrapes)],
            capture_output=True, text=True, timeout=1800, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise click.ClickException(f"{name}: the measurement failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"build": name, "python": python, **result, "summary": summary(result)})
    table = Table(title=f"one /metrics scrape at {backends} backends, in memory (median; max)")
    for col in ("build", "exposition", "loop ms / scrape", "longest stall ms"):
        table.add_column(col, justify="left" if col == "build" else "right")
    for r in results:
        s = r["summary"]
        table.add_row(
            r["build"], f"{r['exposition_bytes'] / 1e6:.2f} MB",
            f"{s['loop_ms_median']} ({s['loop_ms_max']})",
            f"{s['stall_ms_median']} ({s['stall_ms_max']})",
        )  # fmt: skip
    console.print(table)
    report = {
        "benchmark": "metrics_scrape",
        "backends": backends,
        "scrapes": scrapes,
        "builds": results,
        "reference_name": reference_name if reference_python is not None else None,
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    console.print(f"wrote {write_json(out, report)}")


@main.command("child")
@click.option("--backends", type=int, required=True)
@click.option("--scrapes", type=int, required=True)
def child_command(backends: int, scrapes: int) -> None:
    """Measure this interpreter's build (started by the benchmark itself)."""
    print(json.dumps(child(backends, scrapes)))


if __name__ == "__main__":
    main()
