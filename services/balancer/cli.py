"""`twlb balancer`: flags (and TWLB_BALANCER_* environment variables) to a running balancer.

The balancer answers `/healthz`, `/metrics`, `/trust` and `/admin/*` itself; every other
path and method is proxied to a backend.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

import click
from pydantic import ValidationError
from twlb.balancer.upstream import BackendURLError, normalize_backend_url

from twlb.spec import PolicyName, describe_validation_error


def _backend_urls(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    out: list[str] = []
    for item in value:
        # From the environment a single value holds several space-separated URLs.
        for url in item.split():
            try:
                out.append(normalize_backend_url(url))
            except BackendURLError as err:
                raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return tuple(out)


@click.command(context_settings={"show_default": True})
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--backend",
    multiple=True,
    callback=_backend_urls,
    help="Backend origin http://host:port (repeatable; space-separated in the environment).",
)
@click.option(
    "--policy",
    type=click.Choice([p.value for p in PolicyName]),
    default=PolicyName.ROUND_ROBIN.value,
    help="Routing policy.",
)
@click.option("--admin-token", default=None, help="Bearer token of /admin/*; unset: disabled.")
@click.option(
    "--audit-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    help="Share of GET requests cross-checked on two more backends.",
)
@click.option(
    "--probation-audit-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    help="trust policy: share of answers from backends in probation (new, or back after an "
    "ejection) cross-checked, while audits are on (--audit-fraction > 0).",
)
@click.option(
    "--slow-start",
    "slow_start_s",
    type=click.FloatRange(0.0, 600.0),
    default=5.0,
    help="trust policy: seconds over which a backend in probation ramps up to its weight (0: off).",
)
@click.option(
    "--latency-weighting/--no-latency-weighting",
    default=True,
    help="trust policy: scale each trust weight by the backend's current peak-EWMA load "
    "against the best candidate's (off: route on trust alone).",
)
@click.option(
    "--audit-ignore-field",
    "audit_ignore_fields",
    multiple=True,
    default=("node",),
    help="Top-level JSON field that differs between honest backends (their identity) and "
    "is left out when answers are compared (repeatable).",
)
@click.option(
    "--window", "window_s", type=click.FloatRange(0.1, 300.0), default=5.0,
    help="Feature window, seconds.",
)  # fmt: skip
@click.option(
    "--health-interval", "health_interval_s", type=click.FloatRange(0.01, 600.0), default=1.0,
    help="Seconds between active health checks of each backend.",
)  # fmt: skip
@click.option(
    "--health-timeout", "health_timeout_s", type=click.FloatRange(0.01, 60.0), default=0.5,
    help="Timeout of one health check, seconds.",
)  # fmt: skip
@click.option(
    "--healthy-threshold", type=click.IntRange(1, 100), default=2,
    help="Consecutive passing checks that bring a backend back.",
)  # fmt: skip
@click.option(
    "--unhealthy-threshold", type=click.IntRange(1, 100), default=2,
    help="Consecutive failed checks that take a backend out.",
)  # fmt: skip
@click.option(
    "--try-timeout", "try_timeout_s", type=click.FloatRange(0.001, 600.0), default=1.0,
    help="Timeout of one upstream try, seconds.",
)  # fmt: skip
@click.option(
    "--max-tries", type=click.IntRange(1, 10), default=3,
    help="Tries per idempotent request, the first included.",
)  # fmt: skip
@click.option(
    "--retry-budget", type=click.FloatRange(0.0, 10.0), default=0.2,
    help="Retries allowed as a ratio of live requests.",
)  # fmt: skip
@click.option(
    "--max-body-bytes", type=click.IntRange(0, 1 << 30), default=1 << 20,
    help="Largest request body; larger ones get 413.",
)  # fmt: skip
@click.option("--seed", type=click.IntRange(0), default=0, help="Seed of random choices.")
@click.option(
    "--hash-algorithm", type=click.Choice(["sha256", "md5"]), default="sha256",
    help="Ring hash of consistent-hash.",
)  # fmt: skip
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="ONNX trust model (twlb train); re-read when the file changes. Default: heuristic.",
)
@click.option(
    "--oracle-truth",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON {backend_url: node_class} for --policy oracle (re-read when it changes).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
)
@click.pass_context
def command(ctx: click.Context, **options: object) -> None:
    """Run the trust-weighted load balancer in front of --backend origins.

    Paths /healthz, /metrics, /trust and /admin/* are the balancer's own; every other
    path and method is proxied. Quorum reads: header `X-TWLB-Quorum: 2`. Consistent-hash
    key: query parameter `key` or header `X-TWLB-Key`.
    """
    if options["policy"] == PolicyName.ORACLE.value and options["oracle_truth"] is None:
        raise click.UsageError("--policy oracle needs --oracle-truth FILE", ctx=ctx)
    from twlb.balancer.app import OracleTruthError, create_app
    from twlb.balancer.settings import BalancerSettings

    try:
        settings = BalancerSettings(backends=options.pop("backend"), **options)
    except ValidationError as err:
        raise click.UsageError(describe_validation_error(err), ctx=ctx) from None
    refused: tuple[type[Exception], ...] = ()
    if settings.model is not None:  # onnxruntime is heavy: imported only when a model is used
        from twlb.balancer.onnx_scorer import ModelRefused

        refused = (ModelRefused,)
    try:
        app = create_app(settings)
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
    except OSError as err:  # e.g. the port is taken
        raise click.ClickException(
            f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}"
        ) from None
    if received is not None:
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)
