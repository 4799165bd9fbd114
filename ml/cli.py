"""`twlb collect` and `twlb train`: the command-line faces of the trust model's pipeline."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import click
from twlb.ml import collect

from twlb.options import FiniteFloat


class CountOrRange(click.ParamType):
    """A number N, or LO-HI (integers) for a value drawn per run; bounds checked."""

    name = "N|LO-HI"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if not isinstance(value, str):
            return value
        lo_text, sep, hi_text = value.partition("-")
        try:
            numbers = [float(lo_text)] + ([float(hi_text)] if sep else [])
        except ValueError:
            self.fail(f"{value!r} is neither a number nor a range LO-HI", param, ctx)
        if any(not self.low <= n <= self.high for n in numbers):
            self.fail(f"{value!r} is outside {self.low}-{self.high}", param, ctx)
        if not sep:
            n = numbers[0]
            return int(n) if n.is_integer() else n
        lo, hi = numbers
        if not (lo.is_integer() and hi.is_integer() and lo <= hi):
            self.fail(f"range {value!r} needs integers LO <= HI", param, ctx)
        return (int(lo), int(hi))


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Parquet file to write.",
)
@click.option(
    "--source",
    type=click.Choice(["prometheus", "balancer"]),
    default="prometheus",
    help="Where the written rows are read: Prometheus's HTTP API or the balancer's /trust.",
)
@click.option(
    "--cross-check/--no-cross-check",
    default=True,
    help="Live mode: also read the other source and report whether the rows agree.",
)
@click.option(
    "--runs",
    type=click.IntRange(1, 1000),
    default=12,
    help="Runs to collect (attach mode: consecutive watches of --duration each).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    help="Seed of the first run; run i uses seed+i (fault assignment, chaos, load).",
)
@click.option(
    "--backends",
    type=CountOrRange(3, 30),
    default=str(collect.BACKENDS),
    show_default=True,
    help="Backends per run, or LO-HI to draw per run (e.g. 3-6).",
)
@click.option(
    "--duration",
    type=FiniteFloat(min=1.0, max=3600.0),
    default=45.0,
    help="Seconds per run (live) or seconds to watch (attached).",
)
@click.option(
    "--window",
    type=FiniteFloat(min=0.5, max=300.0),
    default=5.0,
    help="Feature window, seconds (the balancer's --window); rows are one window apart.",
)
@click.option(
    "--rate",
    type=CountOrRange(1, 5000),
    default=None,
    help="Requests per second, or LO-HI to draw per run; default drawn per run from "
    f"{collect.RATE_DRAWN[0]}-{collect.RATE_DRAWN[1]}.",
)
@click.option(
    "--scrape-interval",
    type=FiniteFloat(min=0.05, max=0.3),
    default=0.15,
    help="Live mode: scrape interval of the local Prometheus (below the 0.5 s trust tick).",
)
@click.option(
    "--prometheus",
    "prometheus_url",
    default=None,
    help="Attach mode: read a running balancer's windows from this Prometheus (no clusters).",
)
@click.option(
    "--selector",
    default="",
    help='Attach mode: PromQL label matchers narrowing the series, e.g. namespace="twlb".',
)
@click.option(
    "--control-token",
    default=None,
    help="Attach mode: bearer token of the backends' /control/fault (the ground truth).",
)
@click.option("--run-id", default=None, help="Attach mode: run id of the rows.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep cluster logs and state here (default: a temporary directory).",
)
def collect_command(
    out: Path,
    source: str,
    cross_check: bool,
    runs: int,
    seed: int,
    backends: int | tuple[int, int],
    duration: float,
    window: float,
    rate: float | tuple[int, int] | None,
    scrape_interval: float,
    prometheus_url: str | None,
    selector: str,
    control_token: str | None,
    run_id: str | None,
    workdir: Path | None,
) -> None:
    """Record labelled feature windows (live chaos runs, or a running balancer's Prometheus)."""
    from twlb.balancer.features import FEATURE_NAMES
    from twlb.ml.dataset import write_rows

    from twlb.prometheus import PrometheusUnavailable, find_prometheus

    if prometheus_url is not None:
        if not control_token:
            raise click.UsageError("--prometheus needs --control-token to read the ground truth")
        if source != "prometheus":
            raise click.UsageError("--prometheus reads from Prometheus: drop --source balancer")
        rid = run_id or f"attached-{int(time.time())}"
        try:
            rows = collect.collect_attached(
                prometheus_url, control_token, duration, window, rid, seed, runs, selector, _echo
            )
        except (PrometheusUnavailable, RuntimeError, PermissionError) as err:
            raise click.ClickException(str(err)) from None
        meta = {"source": "prometheus", "window_s": repr(window), "description": "attached"}
        write_rows(out, rows, FEATURE_NAMES, meta)
        _echo(f"wrote {len(rows)} rows to {out}")
        return
    if control_token or run_id or selector:
        raise click.UsageError("--control-token, --run-id and --selector need --prometheus URL")
    sources = ["prometheus", "balancer"] if cross_check else [source]
    if "prometheus" in sources:
        try:
            find_prometheus()
        except PrometheusUnavailable as err:
            raise click.UsageError(str(err)) from None
    plans = [collect.plan_run(seed + i, backends, duration, window, rate) for i in range(runs)]
    written: list = []
    agree = total = 0
    for plan in plans:
        result = collect.run_live(
            plan,
            sources,
            workdir=workdir,
            scrape_interval_s=scrape_interval,
            log=_echo,
        )
        written += result.rows[source]
        if cross_check:
            other = result.rows["balancer" if source == "prometheus" else "prometheus"]
            mine = result.rows[source]
            same = len(set(mine) & set(other))
            agree += same
            total += max(len(mine), len(other))
    write_rows(out, written, FEATURE_NAMES, collect.collection_metadata(source, window, plans))
    counts = Counter(r.label for r in written)
    summary = {"rows": len(written), "runs": runs, "labels": dict(sorted(counts.items()))}
    if cross_check:
        summary["sources_agree"] = f"{agree}/{total}"
    _echo(f"wrote {out}: {json.dumps(summary)}")


@click.command()
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    multiple=True,
    help="Parquet file written by `twlb collect` (repeat to train on several).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for the model, its report, confusion matrix and model card.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Split and model seed.")
@click.option(
    "--holdout-fraction",
    type=FiniteFloat(0.05, 0.5),
    default=0.25,
    help="Share of run seeds held out of training for the final figures.",
)
@click.option("--folds", type=click.IntRange(2, 20), default=4, help="GroupKFold folds.")
@click.option(
    "--publish-configmap",
    default=None,
    help="Also publish the model as this Kubernetes ConfigMap (in-cluster or kubeconfig).",
)
@click.option("--namespace", default="default", help="Namespace of --publish-configmap.")
def train_command(
    data: tuple[Path, ...],
    out: Path,
    seed: int,
    holdout_fraction: float,
    folds: int,
    publish_configmap: str | None,
    namespace: str,
) -> None:
    """Train the trust SVM, compare it, export it to ONNX with its model card."""
    from twlb.ml.dataset import DatasetError
    from twlb.ml.train import TrainingError, train

    try:
        result = train(data, out, seed, holdout_fraction, folds, log=_echo)
    except DatasetError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    except TrainingError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(result.report["summary"], sort_keys=True))
    if publish_configmap:
        from twlb.ml.publish import publish_model

        publish_model(publish_configmap, namespace, Path(out), log=_echo)
