"""`twlb load`: the load generator's command line, progress display and exit statuses.

The flags are generated from the plan's and the client's models (LoadPlan in load.py,
ClientPolicy in client.py, BreakerConfig in breaker.py; twlb/options.py): declare a new
setting there, not here. Exit status (twlb/exits.py): 0 for a completed run, 2 for bad
flags or an unreachable target (a report is still written), 130 when SIGINT/SIGTERM
stopped the run (a partial report is written), 1 when a worker process failed.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from twlb.client.breaker import BreakerConfig
from twlb.client.client import ClientPolicy
from twlb.client.load import (
    LoadPlan,
    RunControl,
    WorkerFailed,
    _note_early_stop,
    load_breaker,
    run_load_blocking,
    run_load_in_workers,
)
from twlb.client.report import LoadTally, build_report, render_report, write_report

from twlb.exits import EXIT_INTERRUPTED, UsageFailure
from twlb.options import OutputPath, build, click_options, field_values


class RunFailed(click.ClickException):
    """A worker process failed: the run did not complete (exit status 1)."""


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


@click.command(context_settings={"show_default": True})
@click_options(LoadPlan, exclude={"client"})
@click_options(ClientPolicy, exclude={"breaker"})
@click_options(BreakerConfig, defaults=load_breaker())
@click.option("--out", type=OutputPath(), default=None, help="JSON report.")
@click.option("--quiet", is_flag=True, help="No progress display and no table.")
@click.pass_context
def command(ctx: click.Context, out: Path | None, quiet: bool, **options: object) -> None:
    """Send GET /work at a constant rate, verify every answer, report what happened.

    Open loop: latency counts from each request's scheduled time. Every option is also
    an environment variable (TWLB_LOAD_RATE, ...). Exit status: 0 when the run completed,
    2 for bad options or an unreachable target (the report is still written), 130 when
    interrupted (a partial report is written), 1 when a worker process failed.
    """
    breaker = build(BreakerConfig, ctx, field_values(BreakerConfig, options))
    client = field_values(ClientPolicy, options, exclude={"breaker"})
    policy = build(ClientPolicy, ctx, {**client, "breaker": breaker})
    plan_values = field_values(LoadPlan, options, exclude={"client"})
    plan = build(LoadPlan, ctx, {**plan_values, "client": policy})
    err_console = Console(stderr=True)
    view = None if quiet else ProgressView(err_console, plan)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_early_stop)
    try:
        if plan.workers == 1:
            publish = view.show_tally if view is not None else None
            tally = run_load_blocking(plan, lambda: RunControl(publish=publish))
        else:
            tally = run_load_in_workers(plan, view.show_counts if view is not None else None)
    except WorkerFailed as err:
        raise RunFailed(str(err)) from None
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
        raise UsageFailure(tally.stop_reason or "target unreachable")
    if tally.partial:
        click.echo("twlb load: interrupted: the report is partial", err=True)
        sys.exit(EXIT_INTERRUPTED)
