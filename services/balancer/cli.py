"""`twlb balancer`: flags (and TWLB_BALANCER_* environment variables) to a running balancer.

The flags are generated from BalancerSettings' fields (twlb/options.py): declare a new
setting there, not here.

The balancer answers `/healthz`, `/metrics`, `/trust` and `/admin/*` itself; every other
path and method is proxied to a backend.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import click
from twlb.balancer.settings import BalancerSettings

from twlb.exits import bound_socket, listen_error
from twlb.logs import setup_logging
from twlb.options import build, click_options, field_values
from twlb.tokens import TokenError
from twlb.vocabulary import PolicyName


def _check_listening(ctx: click.Context, fd: int) -> None:
    """--listen-fd must be an inherited TCP socket that listens."""
    import socket

    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise click.BadParameter(
            f"{fd} is not an open socket: {err.strerror or err}", ctx=ctx, param_hint="--listen-fd"
        ) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.detach()  # the server takes the descriptor over later
    if not listening:
        raise click.BadParameter(f"socket {fd} does not listen", ctx=ctx, param_hint="--listen-fd")


def refreeze() -> None:
    """Once the fleet has settled, move its objects (pools, connections, windows) out of
    the cyclic collector's generations, as at start-up: with 1,000 backends full
    collections scanned about 130,000 objects, 85-160 ms with the event loop stopped,
    every few seconds (bench/fleet_scale.py). Unfrozen and collected first, so garbage
    cycles are not kept; objects frozen earlier that became cycles since are found then."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@click.command(context_settings={"show_default": True})
@click_options(BalancerSettings)
@click.pass_context
def command(ctx: click.Context, **options: object) -> None:
    """Run the trust-weighted load balancer in front of --backend origins.

    Paths /healthz, /readyz, /metrics, /trust and /admin/* are the balancer's own: on the
    admin listener with --admin-port (the traffic port then proxies every path), else on
    the traffic port. Quorum reads: header `X-TWLB-Quorum: 2`. Consistent-hash key: query
    parameter `key` or header `X-TWLB-Key`.
    """
    if options["policy"] == PolicyName.ORACLE.value and options["oracle_truth"] is None:
        raise click.UsageError("--policy oracle needs --oracle-truth FILE", ctx=ctx)
    if options["discover_services"] and not options["discover_namespace"]:
        from twlb.balancer.discovery import own_namespace

        if own_namespace() is None:
            raise click.UsageError(
                "--discover-services needs --discover-namespace outside a Kubernetes pod", ctx=ctx
            )
    from twlb.balancer.app import OracleTruthError, create_app
    from twlb.balancer.tls import TLSError, server_context

    settings = build(BalancerSettings, ctx, field_values(BalancerSettings, options))
    # The addresses are tried before anything starts, so one in use is one line and status
    # 2 (the servers bind them again once the balancer is built).
    if settings.listen_fd is None:
        bound_socket("the balancer", settings.host, settings.port).close()
    else:
        _check_listening(ctx, settings.listen_fd)
    if settings.admin_port:
        bound_socket("the admin listener", settings.admin_host, settings.admin_port).close()
    try:
        server_context(settings)
    except TLSError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--tls-cert-file") from None
    refused: tuple[type[Exception], ...] = ()
    if settings.model is not None:  # onnxruntime is heavy: imported only when a model is used
        from twlb.balancer.onnx_scorer import ModelRefused

        refused = (ModelRefused,)
    try:
        app = create_app(settings, fleet_settled=refreeze)
    except OracleTruthError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--oracle-truth") from None
    except TokenError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--admin-token-file") from None
    except TLSError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--backend-ca-file") from None
    except refused as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--model") from None

    setup_logging(settings.log_level, settings.log_format)
    # One line per health check would drown the log; state changes are logged instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Everything imported and built so far lives as long as the process: keep it out of the
    # cyclic collector's generations so full collections stay short on the proxy path.
    gc.freeze()
    import uvloop
    from twlb.balancer.app import serve

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            received = runner.run(serve(app, settings.host, settings.port))
    except OSError as err:  # the port was taken since it was tried
        raise listen_error("the balancer", settings.host, settings.port, err) from None
    if received is not None:
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)
