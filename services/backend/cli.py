"""`twlb backend`: run one backend node (uvicorn) from flags or TWLB_BACKEND_* variables."""

from __future__ import annotations

import gc
import logging
import socket
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource
from pydantic import ValidationError

from twlb.spec import FaultSpec, FaultType

if TYPE_CHECKING:
    import uvicorn

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: FaultSpec field (alias) -> the click parameter that carries it (see FaultSpec.to_args).
FAULT_PARAMS = {
    "type": "fault_type",
    "probability": "fault_probability",
    "delayMs": "delay_ms",
    "errorStatus": "error_status",
    "periodS": "period_s",
    "flapType": "flap_type",
}
_DEFAULT = FaultSpec()
_FAULT_TYPES = click.Choice([t.value for t in FaultType])


def server_config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    """How a node is served: one uvicorn worker on uvloop and httptools, no access log."""
    import uvicorn  # here, so listing `twlb` commands does not import the server

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=log_level,
        lifespan="auto",
        timeout_graceful_shutdown=5,
    )


def _option_named(ctx: click.Context, name: str) -> click.Parameter:
    return next(p for p in ctx.command.params if p.name == name)


def _where(ctx: click.Context, param: click.Parameter) -> str:
    """Where a value came from, so the message names the variable a user must fix."""
    if ctx.get_parameter_source(param.name or "") is ParameterSource.ENVIRONMENT:
        envvar = param.envvar or f"{ctx.auto_envvar_prefix}_{(param.name or '').upper()}"
        return f" (from {envvar})"
    return ""


def build_fault(ctx: click.Context, values: dict[str, object]) -> FaultSpec:
    """The FaultSpec the fault flags describe; a bad value is a BadParameter naming its flag."""
    try:
        return FaultSpec.model_validate({alias: values[p] for alias, p in FAULT_PARAMS.items()})
    except ValidationError as err:
        first = err.errors()[0]
        alias = str(first["loc"][0]) if first["loc"] else ""
        if alias not in FAULT_PARAMS:
            # A check across fields (e.g. flapType) names its field in the message.
            alias = next((a for a in FAULT_PARAMS if a in first["msg"]), "type")
        param = _option_named(ctx, FAULT_PARAMS[alias])
        raise click.BadParameter(
            f"{first['msg']}{_where(ctx, param)}", ctx=ctx, param=param
        ) from None


@click.command(context_settings={"show_default": True})
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8080, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--node-id",
    default=socket.gethostname,
    show_default="hostname",
    help="Name this node reports in answers and metrics.",
)
@click.option(
    "--seed", default=0, type=click.IntRange(min=0), help="Seed of faults and simulation."
)
@click.option(
    "--fault-type", default=_DEFAULT.type.value, type=_FAULT_TYPES, help="The active fault."
)
@click.option(
    "--fault-probability",
    default=_DEFAULT.probability,
    type=float,
    help="Chance per request that the fault acts (0..1).",
)
@click.option(
    "--delay-ms",
    default=_DEFAULT.delay_ms,
    type=int,
    help="Extra latency of delay and lie-latency faults, milliseconds.",
)
@click.option(
    "--error-status",
    default=_DEFAULT.error_status,
    type=int,
    help="HTTP status (5xx) an error fault answers.",
)
@click.option(
    "--period-s",
    default=_DEFAULT.period_s,
    type=float,
    help="Length of each healthy and faulty period of a flapping node, seconds.",
)
@click.option(
    "--flap-type",
    default=_DEFAULT.flap_type.value,
    type=_FAULT_TYPES,
    help="The fault acting in a flapping node's faulty periods.",
)
@click.option(
    "--control-token",
    default=None,
    help="Bearer token of /control/fault; without one the control endpoint is disabled.",
)
@click.option(
    "--simulation/--no-simulation",
    default=True,
    help="Simulate the node's load, latency, packet loss, CPU and memory.",
)
@click.option(
    "--packet-loss",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="Share of connections dropped, overriding the simulated loss.",
)
@click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS), help="Log level.")
@click.pass_context
def command(
    ctx: click.Context,
    host: str,
    port: int,
    node_id: str,
    seed: int,
    control_token: str | None,
    simulation: bool,
    packet_loss: float | None,
    log_level: str,
    **fault_values: object,
) -> None:
    """Run a backend node that does the work and misbehaves as its fault says."""
    from twlb.backend.app import BackendSettings, create_app

    if not node_id.strip():
        raise click.BadParameter("must not be empty", ctx=ctx, param=_option_named(ctx, "node_id"))
    fault = build_fault(ctx, fault_values)
    settings = BackendSettings(
        node_id=node_id,
        seed=seed,
        fault=fault,
        control_token=control_token or None,
        simulation=simulation,
        packet_loss=packet_loss,
    )
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn handles SIGTERM and SIGINT itself: stop accepting, finish in-flight requests.
    import uvicorn

    server = uvicorn.Server(server_config(create_app(settings), host, port, log_level))
    # Everything imported and built so far lives as long as the process: keep it out of the
    # cyclic collector's generations so collections on the /work path stay short.
    gc.freeze()
    server.run()
