"""Benchmark: the basic client versus the resilient one against a flaky setup.

Setup `balancer` (the default): `twlb balancer` (round-robin, no retries of its own, so
whatever resilience shows is the client's) in front of two backends, one answering 500
to 30 % of requests and one benign; the benign one is killed (SIGKILL, as a crash) at
40 % of the run and restarted on the same port at 60 %. Setup `single`: one backend
with error 0.3, killed and restarted the same way; the resilient client can only retry
against it. Each mode gets fresh processes with the same seeds, and the same open-loop
schedule (the generator runs in this process so the crash lands at an exact time).
Three clients run: basic; resilient as `twlb load --mode resilient` sets it up (breaker
at 80 % failed tries); resilient with resilience4j's default breaker (50 %). Prints
success rate and p99 for each; writes reports/bench/client_compare.json.

    .venv/bin/python bench/client_compare.py
    .venv/bin/python bench/client_compare.py --setup single --rate 100 --duration 20
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import uvloop
from client_support import REPORT_DIR, machine, start_service, write_json
from rich.console import Console
from rich.table import Table
from twlb.client.breaker import BreakerConfig
from twlb.client.client import ClientPolicy
from twlb.client.load import LoadPlan, Mode, RunControl, load_breaker, run_load
from twlb.client.report import build_report
from twlb.processes.managed import ManagedProcess

from twlb.options import FiniteFloat

FLAKY = ("--fault-type", "error", "--fault-probability", "0.3", "--seed", "1")
BENIGN = ("--fault-type", "benign", "--seed", "2")
BACKEND_FLAGS = ("--no-simulation", "--log-level", "warning")


class Setup:
    """The processes of one run: backends, maybe a balancer, and which backend crashes."""

    def __init__(self, kind: str, log_dir: Path) -> None:
        self.kind = kind
        self.log_dir = log_dir
        self.procs: list[ManagedProcess] = []
        self.victim_args: tuple[str, ...] = ()
        self.victim_port = 0
        self.victim: ManagedProcess | None = None
        self.url = ""

    def _backend(self, *fault: str) -> tuple[ManagedProcess, str]:
        proc, url = start_service("backend", *BACKEND_FLAGS, *fault, log_dir=self.log_dir)
        self.procs.append(proc)
        return proc, url

    def start(self) -> Setup:
        if self.kind == "single":
            self.victim, self.url = self._backend(*FLAKY)
            self.victim_args = FLAKY
        else:
            _, flaky_url = self._backend(*FLAKY)
            self.victim, benign_url = self._backend(*BENIGN)
            self.victim_args = BENIGN
            balancer, self.url = start_service(
                "balancer",
                "--backend", flaky_url, "--backend", benign_url,
                "--policy", "round-robin", "--max-tries", "1", "--audit-fraction", "0",
                "--health-interval", "0.5", "--log-level", "warning",
                log_dir=self.log_dir,
            )  # fmt: skip
            self.procs.append(balancer)
        self.victim_port = int(
            (benign_url if self.kind == "balancer" else self.url).rsplit(":", 1)[1]
        )
        return self

    def crash(self) -> None:
        assert self.victim is not None
        self.victim.kill()

    def restart(self) -> None:
        self.victim, _ = start_service(
            "backend",
            *BACKEND_FLAGS,
            *self.victim_args,
            port=self.victim_port,
            log_dir=self.log_dir,
        )
        self.procs.append(self.victim)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


#: The clients compared: (name, mode, breaker). `twlb load`'s resilient breaker opens at
#: 80 % failed tries; resilience4j's default, 50 %, is run too: behind a balancer it trips
#: while the balancer is still ejecting a crashed backend.
CLIENTS: tuple[tuple[str, Mode, BreakerConfig], ...] = (
    ("basic", Mode.BASIC, BreakerConfig()),
    ("resilient", Mode.RESILIENT, load_breaker()),
    ("resilient_breaker_50", Mode.RESILIENT, BreakerConfig(failure_rate_threshold=50.0)),
)


async def one_run(
    mode: Mode, breaker: BreakerConfig, kind: str, rate: float, duration: float, log_dir: Path
) -> dict[str, Any]:
    setup = Setup(kind, log_dir).start()
    try:
        plan = LoadPlan(
            url=setup.url, rate=rate, duration_s=duration, mode=mode, keys=500,
            client=ClientPolicy(breaker=breaker),
        )  # fmt: skip
        started = time.monotonic()
        load = asyncio.create_task(run_load(plan, RunControl()))
        timeline = {}
        await asyncio.sleep(0.4 * duration)
        await asyncio.to_thread(setup.crash)
        timeline["crashed_at_s"] = round(time.monotonic() - started, 2)
        await asyncio.sleep(max(0.0, started + 0.6 * duration - time.monotonic()))
        await asyncio.to_thread(setup.restart)
        timeline["restarted_at_s"] = round(time.monotonic() - started, 2)
        tally = await load
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(setup.stop)
    report = build_report(tally, plan.settings())
    report["timeline"] = timeline
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "success_rate": report["success_rate"],
        "p99_ms": report["latency_ms"]["p99"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_all_ms": report["latency_all_ms"]["p99"],
        "sent": report["sent"],
        "correct": report["correct"],
        "wrong": report["wrong"],
        "failed": report["failed"],
        "failed_by_reason": {k: v for k, v in report["failed_by_reason"].items() if v},
        "retries": report["retries"],
        "budget_refusals": report["budget_refusals"],
        "breaker_transitions": report["breaker_transitions"],
        "achieved_rate": report["achieved_rate"],
        "timeline": report["timeline"],
        "breaker_failure_rate_threshold": report.get("breaker", {}).get("failure_rate_threshold"),
    }


@click.command()
@click.option("--setup", "kind", type=click.Choice(["balancer", "single"]), default="balancer")
@click.option("--rate", type=FiniteFloat(min=1.0), default=200.0, show_default=True)
@click.option("--duration", type=FiniteFloat(min=5.0), default=20.0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON path.")
def main(kind: str, rate: float, duration: float, out: Path | None) -> None:
    console = Console(width=150)
    before = machine()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="twlb-client-compare-") as tmp:
        for name, mode, breaker in CLIENTS:
            console.print(f"running {name} against the {kind} setup for {duration:.0f} s")
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runs[name] = runner.run(one_run(mode, breaker, kind, rate, duration, Path(tmp)))
    result = {
        "benchmark": "client_compare",
        "command": " ".join(sys.argv),
        "setup": kind,
        "scenario": (
            "balancer (round-robin, no balancer retries) over a backend with error 0.3 and a "
            "benign one killed at 40% of the run and restarted at 60%"
            if kind == "balancer"
            else "one backend with error 0.3, killed at 40% of the run and restarted at 60%"
        ),
        "rate": rate,
        "duration_s": duration,
        "machine_before": before,
        "machine_after": machine(),
        **{name: summary(runs[name]) for name, _, _ in CLIENTS},
        "reports": runs,
    }
    path = write_json(out or REPORT_DIR / "client_compare.json", result)

    table = Table(title=f"basic vs resilient · {kind} setup · {rate:.0f} req/s · {duration:.0f} s")
    for col in ("mode", "success rate", "p50 ms", "p99 ms", "p99 all ms", "failed", "retries"):
        table.add_column(col, justify="right")
    for name, _, _ in CLIENTS:
        s = result[name]
        table.add_row(
            name,
            f"{100 * s['success_rate']:.2f} %",
            f"{s['p50_ms']}",
            f"{s['p99_ms']}",
            f"{s['p99_all_ms']}",
            " ".join(f"{k}={v}" for k, v in s["failed_by_reason"].items()) or "0",
            str(s["retries"]),
        )
    console.print(table)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
