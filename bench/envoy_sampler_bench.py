"""Benchmark: what the sampler costs Envoy itself, with Envoy the only bottleneck.

bench/envoy_bench.py measures steered Envoy where everything shares two cores and the
Python backends are the bottleneck. This one takes the backends and the control plane
out of the figure, to see the data plane's own cost:

- Envoy runs on CPU 0 alone (one worker); wrk, the backends and the log sink on CPU 1;
- the backends are nginx answering a fixed JSON body (about 10 us a request), so Envoy
  is the bottleneck;
- Envoy runs the listener and the cluster TW-LB serves (dataplane/resources.py: routes,
  retries, the upstream log, the sampler module, the sample log), made static: the same
  three endpoints with slightly different weights as trust gives them, the runtime layer
  as a static layer with the sample share fixed, the access logs sent to a gRPC sink
  that reads and drops them (the control plane's audits are not in this figure);
- the same Envoy with the sampler's filter and the sample log taken out ("no sampler"),
  and plain Envoy (`plain_bootstrap`: round robin, static cluster, retries);
- for each share, Envoy's CPU per request, and the sampler's cost per sampled answer:
  (CPU per request with the sampler - without) / share.

    .venv/bin/python bench/envoy_sampler_bench.py --shares 0.01,0.05,0.2,1 --rounds 3

Figures are printed and written to reports/bench/envoy_sampler_bench.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil
from backend_throughput import measure, report_option, run_wrk, running, wrk_options
from google.protobuf import json_format
from proxy_bench import WORK_PATH, write_report
from rich.console import Console
from rich.table import Table
from twlb.envoy import resources as res
from twlb.envoy.process import envoy_process
from twlb.processes.managed import ManagedProcess, free_port

PLAIN = "plain Envoy"
NO_SAMPLER = "steered config, no sampler"
ENVOY_CPU, OTHERS_CPU = 0, 1
#: The endpoint weights trust gives three honest backends (out of res.WEIGHT_SCALE).
WEIGHTS = (990, 985, 980)

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
{servers}
}}
"""
SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location / {{ return 200 '{{"key":"$arg_key","rounds":"$arg_rounds"}}'; }}
    }}"""


async def _sink(port: int) -> None:
    """A gRPC access log service that reads every message and keeps nothing."""
    import grpc
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    class Sink(als_pb2_grpc.AccessLogServiceServicer):
        async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802
            async for _ in request_iterator:
                pass
            return als_pb2.StreamAccessLogsResponse()

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def steered_bootstrap(
    listen: int, admin: int, sink: int, backends: list[int], share: float, sampler: bool
) -> dict:
    """The listener and cluster TW-LB serves, as a static bootstrap."""
    layout = res.Layout(
        listener=res.Address("127.0.0.1", listen),
        admin=res.Address("127.0.0.1", admin),
        xds=res.Address("127.0.0.1", sink),
        api=res.Address("127.0.0.1", sink),
        sample=share,
    )
    weighted = [res.Endpoint("127.0.0.1", p, w) for p, w in zip(backends, WEIGHTS, strict=True)]
    boot = json_format.MessageToDict(res.static_bootstrap(layout, weighted, 0.01))
    if not sampler:
        listener = boot["staticResources"]["listeners"][0]
        hcm = listener["filterChains"][0]["filters"][0]["typedConfig"]
        hcm.pop("accessLog")
        hcm["httpFilters"] = [f for f in hcm["httpFilters"] if f["name"] != res.SAMPLER_FILTER]
        for route in hcm["routeConfig"]["virtualHosts"][0]["routes"]:
            route.pop("typedPerFilterConfig", None)
    return boot


@click.command()
@click.option("--shares", default="0.01,0.05,0.2,1", show_default=True,
              help="Sample shares to measure, comma-separated, each in (0, 1].")  # fmt: skip
@wrk_options(rounds=3, duration=4, connections=32)
@report_option("envoy_sampler_bench.json")
@click.option("--sink", type=int, hidden=True, help="Run the access log sink on this port.")
def main(
    shares: str, rounds: int, duration: int, connections: int, out: Path, sink: int | None
) -> None:
    """What the sampler and the sample log cost Envoy, at each sample share."""
    if sink is not None:
        asyncio.run(_sink(sink))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        wanted = [float(s) for s in shares.split(",")]
    except ValueError as err:
        raise click.BadParameter(
            f"not a list of numbers: {shares!r}", param_hint="--shares"
        ) from err
    if not wanted or not all(0.0 < s <= 1.0 for s in wanted):
        raise click.BadParameter(
            f"each share must be in (0, 1], got {shares!r}", param_hint="--shares"
        )
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise click.UsageError(f"{tool} is not installed (see .ci/run for the packages)")
    if len(os.sched_getaffinity(0)) < 2:
        raise click.UsageError("needs two CPUs: Envoy on one, everything else on the other")
    os.sched_setaffinity(0, {OTHERS_CPU})  # wrk, nginx and the sink inherit it
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="twlb-sampler-bench-") as tmp:
        root = Path(tmp)
        ports = [free_port() for _ in range(3)]
        servers = "\n".join(SERVER.format(port=p) for p in ports)
        (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, servers=servers))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs: dict[str, ManagedProcess] = {
            "nginx": ManagedProcess(
                [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "stderr"],
                log_path=root / "nginx.log",
            )
        }
        sink_port = free_port()
        procs["sink"] = ManagedProcess(
            [sys.executable, __file__, "--sink", str(sink_port)], log_path=root / "sink.log"
        )
        urls: dict[str, str] = {}
        ready: dict[str, str] = {}

        def envoy(name: str, boot: dict, listen: int, admin: int) -> None:
            procs[name] = envoy_process(json.dumps(boot), root / f"envoy-{len(urls)}")
            urls[name] = f"http://127.0.0.1:{listen}{WORK_PATH}"
            ready[name] = f"http://127.0.0.1:{admin}/ready"

        listen, admin = free_port(), free_port()
        plain = res.plain_bootstrap(
            res.Address("127.0.0.1", listen),
            res.Address("127.0.0.1", admin),
            [("127.0.0.1", p) for p in ports],
        )
        envoy(PLAIN, json_format.MessageToDict(plain), listen, admin)
        listen, admin = free_port(), free_port()
        envoy(NO_SAMPLER, steered_bootstrap(listen, admin, sink_port, ports, 0.0, False),
              listen, admin)  # fmt: skip
        for share in wanted:
            listen, admin = free_port(), free_port()
            boot = steered_bootstrap(listen, admin, sink_port, ports, share, True)
            envoy(f"sampler at {share:g}", boot, listen, admin)
        with running(procs, ready):
            for name in ready:
                psutil.Process(procs[name].pid).cpu_affinity([ENVOY_CPU])
            report = speed_run(urls, procs, wanted, rounds, duration, connections)
    write_report(out, report, load_before)


def speed_run(
    urls: dict[str, str],
    procs: dict[str, ManagedProcess],
    shares: list[float],
    rounds: int,
    duration: int,
    connections: int,
) -> dict:
    console = Console(width=120)
    names = list(urls)
    for name in names:  # warm-up: connections
        run_wrk(name, 0, urls[name], 2, connections, 1)
    per_request: dict[str, list[float]] = {n: [] for n in names}
    rps: dict[str, list[float]] = {n: [] for n in names}
    for r in range(1, rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            run = measure(name, procs[name], r, urls[name], duration, connections, 1)
            per_request[name].append(run.server_cpu_us_per_request)
            rps[name].append(run.ok_per_s)
            console.print(f"round {r} {name}: {run.requests_per_s:,.0f} req/s, "
                          f"Envoy {per_request[name][-1]:.1f} us/request")  # fmt: skip
    cpu_us = {n: statistics.median(v) for n, v in per_request.items()}
    ok_per_s = {n: statistics.median(v) for n, v in rps.items()}
    base = cpu_us[NO_SAMPLER]
    per_sample = {f"{s:g}": (cpu_us[f"sampler at {s:g}"] - base) / s for s in shares}
    table = Table(title=f"Envoy alone on CPU {ENVOY_CPU}, nginx backends, wrk -c{connections} "
                        f"-d{duration}s, {rounds} rounds")  # fmt: skip
    for col in ("Envoy", "median 2xx req/s", "Envoy CPU us/request", "over plain Envoy",
                "sampler us per sampled answer"):  # fmt: skip
        table.add_column(col)
    for name in names:
        share = name.removeprefix("sampler at ")
        table.add_row(
            name,
            f"{ok_per_s[name]:,.0f}",
            f"{cpu_us[name]:.1f}",
            f"{ok_per_s[name] / ok_per_s[PLAIN]:.3f}",
            f"{per_sample[share]:.0f}" if share in per_sample else "",
        )
    console.print(table)
    return {
        "benchmark": "envoy_sampler_bench",
        "path": WORK_PATH,
        "wrk": {"threads": 1, "connections": connections, "duration_s": duration, "rounds": rounds},
        "envoy_cpu": ENVOY_CPU,
        "ok_requests_per_s": ok_per_s,
        "envoy_cpu_us_per_request": cpu_us,
        "sampler_us_per_sampled_answer": per_sample,
        "over_plain_envoy": {n: ok_per_s[n] / ok_per_s[PLAIN] for n in names},
        "runs_cpu_us_per_request": per_request,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


if __name__ == "__main__":
    main()
