"""`twlb dashboard`: serve the live dashboard page for a running cluster."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click
from twlb.processes.state import DEFAULT_STATE_DIR

from twlb.exits import listen_error
from twlb.logs import setup_logging
from twlb.options import FiniteFloat


@click.command("dashboard")
@click.option(
    "--state-dir",
    default=None,
    type=click.Path(file_okay=False),
    help=f"A `twlb up` state directory to show (default {DEFAULT_STATE_DIR} "
    "unless --balancer is given).",
)
@click.option(
    "--balancer",
    default=None,
    help="Show the cluster behind this balancer URL instead (the Kubernetes sidecar).",
)
@click.option(
    "--control-token",
    default=None,
    help="With --balancer: the nodes' control token, to read their live faults (kept "
    "server-side; without it the page shows no true fault). Prefer the environment "
    "variable TWLB_DASHBOARD_CONTROL_TOKEN: a flag shows in the process list.",
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8090, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option(
    "--interval",
    default=1.0,
    type=FiniteFloat(0.2, 60.0),
    help="Seconds between polling rounds (and pushed frames).",
)
def command(
    state_dir: str | None, balancer: str | None, control_token: str | None, host: str,
    port: int, interval: float,
) -> None:  # fmt: skip
    """Serve the live dashboard of a running cluster (read-only)."""
    from twlb.dashboard.server import BalancerSource, DashboardServer, StateDirSource

    setup_logging("info")
    if state_dir and balancer:
        raise click.UsageError("give --state-dir or --balancer, not both")
    if balancer:
        if not balancer.startswith(("http://", "https://")):
            raise click.BadParameter(f"{balancer!r} is not an http(s) URL", param_hint="--balancer")
        source: StateDirSource | BalancerSource = BalancerSource(balancer, control_token)
    else:
        source = StateDirSource(Path(state_dir or DEFAULT_STATE_DIR))
    try:
        server = DashboardServer(source, host=host, port=port, interval_s=interval)
    except OSError as err:
        raise listen_error("the dashboard", host, port, err) from None
    click.echo(f"dashboard: {server.url}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve())
