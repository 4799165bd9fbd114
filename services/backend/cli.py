"""`twlb backend`: run one backend node (uvicorn, services/backend/server.py) from flags or
TWLB_BACKEND_* variables."""

from __future__ import annotations

import gc
import socket

import click
from twlb.backend.settings import BackendSettings

from twlb.exits import bound_socket
from twlb.logs import setup_logging
from twlb.options import build, click_options, field_values
from twlb.spec import FaultSpec, GossipSpec
from twlb.tokens import TokenError


def _option_named(ctx: click.Context, name: str) -> click.Parameter:
    return next(p for p in ctx.command.params if p.name == name)


def build_fault(ctx: click.Context, values: dict[str, object]) -> FaultSpec:
    """The FaultSpec the fault flags describe; a bad value is a BadParameter naming its flag."""
    return build(FaultSpec, ctx, field_values(FaultSpec, values))


@click.command(context_settings={"show_default": True})
@click_options(BackendSettings, exclude={"fault", "gossip"})
# The fault flags come from FaultSpec's fields; the model checks their bounds (and so
# names the environment variable a bad value came from). The same for gossip.
@click_options(FaultSpec, ranges=False)
@click_options(GossipSpec, ranges=False)
@click.pass_context
def command(ctx: click.Context, **options: object) -> None:
    """Run a backend node that does the work and misbehaves as its fault says."""
    from twlb.backend.app import create_app

    values = field_values(BackendSettings, options, exclude={"fault", "gossip"})
    gossip = build(GossipSpec, ctx, field_values(GossipSpec, options))
    settings = build(
        BackendSettings, ctx, {**values, "fault": build_fault(ctx, options), "gossip": gossip}
    )
    host, port, log_level = settings.host, settings.port, settings.log_level
    # The listening socket is bound here, so an address in use is one line and status 2
    # (uvicorn would log a traceback and exit 3). The gossip UDP port is tried the same
    # way just before the agent binds it at start-up.
    listener = bound_socket("the node", host, port)
    gossip = settings.gossip_run()
    if gossip is not None:
        bound_socket("the node's gossip", *gossip.bind, kind=socket.SOCK_DGRAM).close()
    setup_logging(log_level, settings.log_format)
    # uvicorn handles SIGTERM and SIGINT itself: stop accepting, finish in-flight requests.
    import uvicorn
    from twlb.backend.server import server_config

    try:
        app = create_app(settings)
    except TokenError as err:
        listener.close()
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--control-token-file") from None
    server = uvicorn.Server(server_config(app, host, port, log_level, settings.head_limits))
    # Everything imported and built so far lives as long as the process: keep it out of the
    # cyclic collector's generations so collections on the /work path stay short.
    gc.freeze()
    with listener:
        server.run(sockets=[listener])
