"""`twlb operator` runs the TrustCluster operator (kopf); `twlb crd` prints the CRD YAML."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import click
from twlb.operator.crd import render_crd_yaml

from twlb.exits import UsageFailure, bound_socket
from twlb.logs import setup_logging
from twlb.options import FiniteFloat

NO_CLUSTER = (
    "no Kubernetes credentials to run against (in a pod: its service account; elsewhere: "
    "KUBECONFIG or ~/.kube/config)"
)


def _liveness(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An empty value, or an http://HOST:PORT/PATH address kopf can serve its probe on."""
    if not value:
        return value
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as err:
        raise click.BadParameter(f"{value!r}: {err}") from None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise click.BadParameter(f"{value!r} is not http://HOST:PORT/PATH (or empty to disable)")
    return value


@click.command()
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    help="Namespace (or glob) to watch; repeatable. Default: all namespaces.",
)
@click.option(
    "--liveness",
    default="http://0.0.0.0:8080/healthz",
    callback=_liveness,
    help="kopf's liveness endpoint; empty to disable.",
)
@click.option(
    "--status-interval",
    type=FiniteFloat(min=0.5, max=3600),
    default=10.0,
    help="Seconds between status refreshes (readiness and /trust).",
)
@click.option(
    "--trust-threshold",
    type=FiniteFloat(0.0, 1.0),
    default=0.5,
    help="A backend with trust below this counts as suspected.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=16,
    help="Threads running handlers (API calls fan out on a pool of half as many).",
)
@click.option(
    "--scan/--no-scan",
    default=True,
    help="Discover namespaces and CRDs at run time (kopf scanning); off needs no RBAC for them.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def command(
    namespaces: tuple[str, ...],
    liveness: str,
    status_interval: float,
    trust_threshold: float,
    workers: int,
    scan: bool,
    verbose: bool,
) -> None:
    """Run the TrustCluster operator against the cluster of the current credentials."""
    import kopf
    from twlb.operator.handlers import OperatorConfig, make_settings, register

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    config = OperatorConfig(
        status_interval_s=status_interval,
        trust_threshold=trust_threshold,
        handler_workers=workers,
        api_workers=max(2, workers // 2),
    )
    registry = register(config)
    settings = make_settings(config)
    settings.scanning.disabled = not scan
    # The operator's own login (handlers.py), tried before kopf starts: with no
    # credentials kopf logs a traceback per watcher before giving up.
    quiet = logging.getLogger("twlb.operator.login")
    try:
        found = kopf.login_with_service_account(
            settings=settings, logger=quiet
        ) or kopf.login_with_kubeconfig(settings=settings, logger=quiet)
    except Exception as err:  # an unreadable or malformed kubeconfig: no credentials either
        raise UsageFailure(f"{NO_CLUSTER}: {err}") from None
    if not found:
        raise UsageFailure(NO_CLUSTER)
    if liveness:
        # Tried here, so an address in use is one line and status 2 (kopf would wait on
        # the cluster first and never say); kopf binds it again at start.
        probe = urlsplit(liveness)
        bound_socket("the liveness probe", probe.hostname or "", probe.port or 0).close()

    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=settings,
                # One replica (Recreate); peering would need its own CRDs for nothing.
                standalone=True,
                clusterwide=not namespaces,
                namespaces=list(namespaces),
                liveness_endpoint=liveness or None,
            )
        )
    except kopf.LoginError:  # the credentials stopped working after the first login
        raise UsageFailure(NO_CLUSTER) from None


@click.command()
def crd_command() -> None:
    """Print the TrustCluster CustomResourceDefinition (k8s/crd.yaml) as YAML."""
    click.echo(render_crd_yaml(), nl=False)
