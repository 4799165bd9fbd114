"""Benchmark: CPU per proxied request spent in the balancer's own code, without sockets.

The proxy benchmark (bench/proxy_bench.py) measures a whole balancer process, where the
kernel's socket work and the event loop dominate. This one drives the request path above
them in memory, as the server drives it: `BalancerApp.handle` for `GET /work`, header
rules, routing, the try against a backend (an in-memory upstream answering at once), the
feature window, health, metrics, the reply, and under the trust policy the audit
decision and the audits themselves (each audit asks two more in-memory backends). So the
figure is what the balancer's Python costs per request, and what is left of a process's
CPU per request is the HTTP parsing, the sockets and the loop. CPU time of this process,
best of `--repeats`. Printed and written to reports/bench/core_path.json.

CPU time on a shared machine moves with the load. `--calls` also counts the function
calls (Python and built-in, by cProfile) per request over one more run of `--requests`:
the same for the same code whatever else the machine does, so two builds compared by it
differ only by what they do per request.

    .venv/bin/python bench/core_path.py
    .venv/bin/python bench/core_path.py --calls
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
from pathlib import Path

import click
import uvloop
from client_support import REPORT_DIR, machine, write_json
from rich.console import Console
from rich.table import Table
from twlb.balancer.app import BalancerApp, Reply
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.upstream import UpstreamResponse

from twlb.spec import PolicyName

BODY = b'{"node":"bench","key":"bench","rounds":1,"result":"0123456789abcdef"}'
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
CASES = (("round-robin", 0.0), ("trust", 0.0), ("trust", 0.05), ("trust", 0.2))


class InstantUpstream:
    """A backend that answers every request at once with the same honest answer."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse:
        return UpstreamResponse(
            200,
            [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
            BODY,
        )

    def close(self) -> None:
        pass


async def drive(app: BalancerApp, n: int) -> None:
    balancer = app.balancer
    for _ in range(n):
        reply = app.handle(
            "GET", b"/work", b"key=bench&rounds=1", HEADERS,
            ("127.0.0.1", 40000), ("127.0.0.1", 8080), b"",
        )  # fmt: skip
        if not isinstance(reply, Reply):
            reply = await reply
        if reply.status != 200:
            raise click.ClickException(f"the in-memory path answered {reply.status}")
        if balancer._background:  # audits run after the answer, as in the server
            await asyncio.gather(*balancer._background)


def per_request_us(
    policy: str, audits: float, requests: int, repeats: int, calls: bool = False
) -> tuple[float, float | None]:
    """Best CPU microseconds per request, and (with `calls`) function calls per request."""
    settings = BalancerSettings(
        backends=tuple(f"http://127.0.0.1:{20000 + i}" for i in range(3)),
        policy=PolicyName(policy),
        audit_fraction=audits,
        model="heuristic",
        # No access log, as the builds before it (which have no such setting).
        **(
            {"access_log_sample": 0.0}
            if "access_log_sample" in BalancerSettings.model_fields
            else {}
        ),
    )
    app = BalancerApp(settings, transport=InstantUpstream, health_transport=InstantUpstream)
    best = float("inf")
    counted: float | None = None

    async def run() -> float:
        balancer = app.balancer
        for _ in range(3):  # warm-up, and trust ticks that take the fleet out of probation
            await drive(app, 1000)
            balancer.update_trust(balancer.clock())
        states = {balancer.engine.state(b).value for b in balancer.backends}
        if policy == "trust" and states != {"trusted"}:
            raise click.ClickException(f"the fleet should be trusted by now, is {states}")
        nonlocal best, counted
        for _ in range(repeats):
            began = time.process_time()
            await drive(app, requests)
            best = min(best, (time.process_time() - began) / requests * 1e6)
        if calls:
            profile = cProfile.Profile()
            profile.enable()
            await drive(app, requests)
            profile.disable()
            counted = pstats.Stats(profile).total_calls / requests  # type: ignore[attr-defined]
        return best

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the balancer runs
        runner.run(run())
    return best, counted


@click.command()
@click.option("--requests", default=20_000, type=click.IntRange(1000), show_default=True)
@click.option("--repeats", default=5, type=click.IntRange(1, 50), show_default=True)
@click.option("--out", default=REPORT_DIR / "core_path.json", type=click.Path(path_type=Path),
              show_default=True)  # fmt: skip
@click.option("--calls", is_flag=True, help="Also count function calls per request (cProfile).")
def main(requests: int, repeats: int, out: Path, calls: bool) -> None:
    """CPU microseconds per request through the balancer's request path, in memory."""
    rows = []
    for policy, audits in CASES:
        us, n = per_request_us(policy, audits, requests, repeats, calls)
        row = {"policy": policy, "audit_fraction": audits, "cpu_us_per_request": us}
        if n is not None:
            row["calls_per_request"] = n
        rows.append(row)
    table = Table(title=f"in-memory request path, best of {repeats} x {requests:,} requests")
    columns = ["policy", "audit fraction", "CPU us / request", "vs round-robin"]
    for col in columns + (["calls / request"] if calls else []):
        table.add_column(col, justify="left" if col == "policy" else "right")
    base = rows[0]["cpu_us_per_request"]
    for r in rows:
        us = r["cpu_us_per_request"]
        cells = [r["policy"], f"{r['audit_fraction']:g}", f"{us:.1f}", f"{us / base:.2f}x"]
        if calls:
            cells.append(f"{r['calls_per_request']:.2f}")
        table.add_row(*cells)
    Console().print(table)
    path = write_json(out, {"benchmark": "core_path", "rows": rows, "machine": machine()})
    Console().print(f"wrote {path}")


if __name__ == "__main__":
    main()
