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
from twlb.options import build, click_options, field_values
from twlb.vocabulary import PolicyName


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

    Paths /healthz, /metrics, /trust and /admin/* are the balancer's own; every other
    path and method is proxied. Quorum reads: header `X-TWLB-Quorum: 2`. Consistent-hash
    key: query parameter `key` or header `X-TWLB-Key`.
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

    settings = build(BalancerSettings, ctx, field_values(BalancerSettings, options))
    # The address is tried before anything starts, so one in use is one line and status 2
    # (the server binds it again once the balancer is built).
    bound_socket("the balancer", settings.host, settings.port).close()
    refused: tuple[type[Exception], ...] = ()
    if settings.model is not None:  # onnxruntime is heavy: imported only when a model is used
        from twlb.balancer.onnx_scorer import ModelRefused

        refused = (ModelRefused,)
    try:
        app = create_app(settings, fleet_settled=refreeze)
    except OracleTruthError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--oracle-truth") from None
    except refused as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--model") from None

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
