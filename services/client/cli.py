"""`twlb load`: the load generator's command line, progress display and exit statuses.

Exit status: 0 for a completed run, 2 for bad flags or an unreachable target (a report
is still written), 130 when SIGINT/SIGTERM stopped the run (a partial report is
written), 1 when a worker process failed.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from twlb.client.breaker import BreakerConfig
from twlb.client.load import (
    LOAD_BREAKER_FAILURE_RATE,
    LoadPlan,
    Mode,
    RunControl,
    WorkerFailed,
    _note_early_stop,
    run_load_blocking,
    run_load_in_workers,
)
from twlb.client.report import LoadTally, build_report, render_report, write_report

from twlb.options import FiniteFloat
from twlb.work import ROUNDS_MAX, ROUNDS_MIN, key_problem

EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130
EXIT_WORKER_FAILED = 1

POSITIVE = FiniteFloat(min=0.0, min_open=True)


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as err:
        raise click.BadParameter(f"{value!r} is not a URL: {err}") from None
    if url.scheme not in ("http", "https"):
        raise click.BadParameter(f"{value!r} must start with http:// or https://")
    if not url.host:
        raise click.BadParameter(f"{value!r} has no host")
    if url.query or url.fragment:
        raise click.BadParameter(f"{value!r} must be a base URL without a query or fragment")
    return value.rstrip("/")


class ProgressView:
    """Live counts and rate on stderr while a run goes."""

    def __init__(self, console: Console, plan: LoadPlan) -> None:
        expected = plan.rate * plan.duration_s
        if plan.count is not None:
            expected = min(expected, plan.count)
        self._progress = Progress(
            TextColumn("[bold]sending"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("sent", total=max(1.0, expected))
        self._counts = Text("")
        self._live = Live(
            Group(self._progress, self._counts), console=console, refresh_per_second=4
        )
        self._started = False

    def stop(self) -> None:
        if self._started:
            self._live.stop()

    def update(self, sent: int, correct: int, wrong: int, failed: int) -> None:
        # Started on the first update, so worker processes are forked before rich's
        # refresh thread exists.
        if not self._started:
            self._live.start()
            self._started = True
        task = self._progress.tasks[self._task]
        elapsed = task.elapsed or 0.0
        rate = sent / elapsed if elapsed > 0 else 0.0
        self._progress.update(self._task, completed=sent)
        self._counts.plain = (
            f"correct {correct}  wrong {wrong}  failed {failed}  "
            f"in flight {max(0, sent - correct - wrong - failed)}  rate {rate:.0f}/s"
        )

    def show_tally(self, tally: LoadTally) -> None:
        self.update(tally.sent, tally.correct, tally.wrong, tally.failed)

    def show_counts(self, counts: list[int]) -> None:
        totals = [sum(counts[i::4]) for i in range(4)]
        self.update(*totals)


@click.command()
@click.option("--url", required=True, callback=_check_url, help="Balancer or backend base URL.")
@click.option("--rate", type=POSITIVE, default=100.0, help="Requests per second (arrivals).")
@click.option("--duration", type=POSITIVE, default=10.0, help="Seconds to send for.")
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="Stop after this many requests."
)
@click.option(
    "--mode",
    type=click.Choice([m.value for m in Mode]),
    default=Mode.RESILIENT.value,
    help="basic: one try, no breaker; resilient: breaker, retries, budget, deadline.",
)
@click.option("--key-prefix", default="key-", help="Keys are PREFIX0 .. PREFIX(N-1).")
@click.option("--keys", type=click.IntRange(min=1), default=1000, help="Distinct keys.")
@click.option(
    "--rounds",
    type=click.IntRange(ROUNDS_MIN, ROUNDS_MAX),
    default=1,
    help="Hash rounds per request.",
)
@click.option("--timeout", type=POSITIVE, default=1.0, help="Per-try timeout, seconds.")
@click.option(
    "--deadline", type=POSITIVE, default=3.0, help="Whole-call deadline (resilient), seconds."
)
@click.option(
    "--attempts", type=click.IntRange(min=1), default=3, help="Tries per call (resilient)."
)
@click.option(
    "--hedge-quantile",
    type=FiniteFloat(0.0, 1.0, min_open=True, max_open=True),
    default=None,
    help="Hedge a try slower than this quantile of recent ones (resilient).",
)
@click.option(
    "--breaker-failure-rate",
    type=FiniteFloat(0.0, 100.0, min_open=True),
    default=LOAD_BREAKER_FAILURE_RATE,
    help="Failure rate (percent) of tries that opens the breaker (resilient).",
)
@click.option(
    "--breaker-min-calls",
    type=click.IntRange(min=1),
    default=20,
    help="Calls in the window before the breaker judges.",
)
@click.option("--breaker-wait", type=FiniteFloat(min=0.0), default=2.0, help="Seconds open.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the key sequence.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, help="Sending processes.")
@click.option(
    "--pool-size", type=click.IntRange(min=1), default=256, help="Connections per process."
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSON report."
)
@click.option("--quiet", is_flag=True, help="No progress display and no table.")
def command(
    url: str,
    rate: float,
    duration: float,
    count: int | None,
    mode: str,
    key_prefix: str,
    keys: int,
    rounds: int,
    timeout: float,
    deadline: float,
    attempts: int,
    hedge_quantile: float | None,
    breaker_failure_rate: float,
    breaker_min_calls: int,
    breaker_wait: float,
    seed: int,
    workers: int,
    pool_size: int,
    out: Path | None,
    quiet: bool,
) -> None:
    """Send GET /work at a constant rate, verify every answer, report what happened.

    Open loop: latency counts from each request's scheduled time. Every option is also
    an environment variable (TWLB_LOAD_RATE, ...). Exit status: 0 when the run completed,
    2 for bad options or an unreachable target (the report is still written), 130 when
    interrupted (a partial report is written), 1 when a worker process failed.
    """
    for probe in (f"{key_prefix}0", f"{key_prefix}{keys - 1}"):
        problem = key_problem(probe)
        if problem is not None:
            raise click.BadParameter(f"keys like {probe!r}: {problem}", param_hint="--key-prefix")
    plan = LoadPlan(
        url=url,
        rate=rate,
        duration_s=duration,
        count=count,
        mode=Mode(mode),
        key_prefix=key_prefix,
        keys=keys,
        rounds=rounds,
        timeout_s=timeout,
        deadline_s=deadline,
        max_attempts=attempts,
        hedge_quantile=hedge_quantile,
        seed=seed,
        workers=workers,
        pool_size=pool_size,
        breaker=BreakerConfig(
            failure_rate_threshold=breaker_failure_rate,
            minimum_calls=breaker_min_calls,
            window_size=max(BreakerConfig.window_size, breaker_min_calls),
            wait_in_open_s=breaker_wait,
        ),
    )
    err_console = Console(stderr=True)
    view = None if quiet else ProgressView(err_console, plan)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_early_stop)
    try:
        if workers == 1:
            publish = view.show_tally if view is not None else None
            tally = run_load_blocking(plan, lambda: RunControl(publish=publish))
        else:
            tally = run_load_in_workers(plan, view.show_counts if view is not None else None)
    except WorkerFailed as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(EXIT_WORKER_FAILED)
    finally:
        if view is not None:
            view.stop()

    report = build_report(tally, plan.settings())
    if out is not None:
        write_report(report, out)
    if not quiet:
        render_report(report, Console())
        if out is not None:
            err_console.print(f"report written to {out}")
    if tally.unreachable:
        err_console.print(f"[bold red]error:[/] {tally.stop_reason}")
        sys.exit(EXIT_UNREACHABLE)
    if tally.partial:
        err_console.print("[yellow]interrupted: the report is partial[/]")
        sys.exit(EXIT_INTERRUPTED)
