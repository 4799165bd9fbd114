"""`twlb train`: the command-line face of training the trust model (`twlb collect`, which
runs clusters to record the data, is orchestration: orchestration/collect.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from twlb.options import FiniteFloat, OutputPath


def _echo(message: str) -> None:
    click.echo(message, err=True)


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
    type=OutputPath(directory=True),
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
