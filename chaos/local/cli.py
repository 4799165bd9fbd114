"""`twlb chaos` (also `python -m twlb.chaos`): record windows, read journals, build datasets.

- `record`: while experiments run, record a running cluster's feature windows and truth;
- `labels`: print the kill/fault intervals a journal holds, as JSON;
- `check`: exit 1 unless journals completed with the steady state met before and after;
- `dataset`: label recordings from journals and write the training dataset (Parquet).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click
from chaoslib.exceptions import ActivityFailed
from twlb.chaos.journal import (
    JournalError,
    chaos_intervals,
    read_journal,
    steady_state_problems,
)

from twlb.exits import OneLineGroup
from twlb.options import FiniteFloat, OutputPath


@click.group("chaos", cls=OneLineGroup, context_settings={"auto_envvar_prefix": "TWLB_CHAOS"})
def command() -> None:
    """Chaos experiments' data: recordings, journal intervals and labelled datasets."""


@command.command("record")
@click.option(
    "--state-dir", required=True, type=click.Path(file_okay=False), help="`twlb up`'s state dir."
)
@click.option("--out", required=True, type=OutputPath())
@click.option("--run-id", required=True, help="Run id the dataset rows will carry.")
@click.option("--seed", required=True, type=click.IntRange(min=0), help="The cluster's seed.")
@click.option(
    "--max-duration",
    default=1800.0,
    type=FiniteFloat(min=1.0, max=86400.0),
    help="Stop after this many seconds at the latest (SIGTERM stops it earlier).",
)
def record_command(state_dir: str, out: Path, run_id: str, seed: int, max_duration: float) -> None:
    """Record feature windows and ground truth until SIGTERM/SIGINT or --max-duration."""
    from twlb.chaos.recorder import record

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        n = record(state_dir, out, run_id, seed, max_duration, stop, log=click.echo)
    except ActivityFailed as err:
        raise click.BadParameter(str(err), param_hint="--state-dir") from None
    click.echo(f"recorded {n} windows to {out}")


@command.command("labels")
@click.argument("journal", type=click.Path(dir_okay=False))
def labels_command(journal: str) -> None:
    """Print the intervals during which JOURNAL's experiment had a node killed or faulted."""
    try:
        intervals = chaos_intervals(read_journal(journal))
    except JournalError as err:
        raise click.BadParameter(str(err), param_hint="JOURNAL") from None
    click.echo(
        json.dumps(
            [
                {
                    "node": i.node,
                    "label": i.label.value,
                    "fault": i.fault,
                    "start": i.start,
                    "end": i.end,
                    "activity": i.activity,
                    "experiment": i.experiment,
                }
                for i in intervals
            ],
            indent=2,
        )
    )


@command.command("check")
@click.argument("journals", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check_command(journals: tuple[str, ...]) -> None:
    """Exit 1 unless every JOURNAL completed with its steady state met before and after."""
    failed = False
    for path in journals:
        try:
            problems = steady_state_problems(read_journal(path))
        except JournalError as err:
            raise click.BadParameter(str(err), param_hint="JOURNALS") from None
        for p in problems:
            click.echo(f"{path}: {p}", err=True)
        failed = failed or bool(problems)
        if not problems:
            click.echo(f"{path}: completed, steady state met before and after")
    if failed:
        raise SystemExit(1)


@command.command("dataset")
@click.option(
    "--recording",
    "recordings",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A recording from `record` (repeatable: one per run).",
)
@click.option(
    "--journal",
    "journals",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A journal from `chaos run --journal-path` (repeatable).",
)
@click.option("--out", required=True, type=OutputPath())
@click.option(
    "--min-overlap",
    default=0.25,
    type=FiniteFloat(0.0, 1.0, min_open=True),
    help="Share of a window a kill/fault must cover to label it.",
)
def dataset_command(
    recordings: tuple[str, ...], journals: tuple[str, ...], out: Path, min_overlap: float
) -> None:
    """Label recorded windows from journals (else ground truth) into a training dataset."""
    from twlb.balancer.features import FEATURE_NAMES
    from twlb.chaos.recorder import RecordingError, build_rows, dataset_metadata, read_recording
    from twlb.ml.dataset import write_rows

    try:
        docs = [read_journal(j) for j in journals]
    except JournalError as err:
        raise click.BadParameter(str(err), param_hint="--journal") from None
    try:
        recs = [read_recording(r) for r in recordings]
    except RecordingError as err:
        raise click.BadParameter(str(err), param_hint="--recording") from None
    rows = [row for rec in recs for row in build_rows(rec, docs, min_overlap)]
    if not rows:
        raise click.ClickException("no labelled windows: the recordings hold no usable window")
    write_rows(out, rows, FEATURE_NAMES, dataset_metadata(recs, docs))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    click.echo(json.dumps({"out": str(out), "windows": len(rows), "labels": counts}))
