"""Benchmark: `twlb up`'s balancer replicas against nginx with as many workers as the
machine has cores, side by side on the same backends.

The embedded runtime (orchestration/runtime.py) starts three benign `twlb backend` nodes
(simulation on, as deployed) and `--replicas` balancer processes (default: the number of
cores) accepting from one socket; nginx (Debian's nginx-light, a generated round-robin
keepalive config, `worker_processes` = cores) proxies to the same nodes. wrk drives one
proxy at a time, in alternating order, for several rounds: nginx, the replicas under
round robin (no audits), the replicas under trust with 5% audits, each after an
unmeasured warm-up (`--warmup`: a restarted trust balancer audits new backends at the
probation fraction, 0.5, until they are trusted). For each run: requests
a second, and CPU per answered request of the proxy's processes (nginx's master and
workers; every balancer replica), from /proc through psutil. The medians, their ratio to
nginx's, and how the replicas shared the requests are printed and written as JSON.

    .venv/bin/python bench/replicas_bench.py --out docs/results/replicas_bench.json
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx
from backend_throughput import report_option, run_wrk, wrk_options
from proxy_bench import nginx_process, tree_cpu_s, write_report
from rich.console import Console
from rich.table import Table
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.processes.managed import ManagedProcess, free_port, free_port_range

from twlb.spec import TrustCluster

WORK_PATH = "/work?key=bench&rounds=1"
NGINX = "nginx, a worker per core"
ROUND_ROBIN = "twlb replicas, round robin"
TRUST = "twlb replicas, trust, 5% audits"


def cluster_spec(replicas: int, audit_fraction: float) -> TrustCluster:
    return TrustCluster.model_validate(
        {
            "apiVersion": "twlb.dev/v1alpha1",
            "kind": "TrustCluster",
            "metadata": {"name": "bench"},
            "spec": {
                "backends": 3,
                "seed": 0,
                "policy": "round-robin",
                "balancer": {"replicas": replicas, "auditFraction": audit_fraction},
                "gossip": {"enabled": False},
            },
        }
    )


def replica_cpu_s(cluster: EmbeddedCluster) -> float:
    return sum(tree_cpu_s(r.proc.pid) for r in cluster.balancers if r.proc is not None)


def replica_requests(cluster: EmbeddedCluster) -> list[float]:
    """Client requests each replica has answered (its /metrics, on its admin listener)."""
    out = []
    for admin in cluster.admin_urls:
        text = httpx.get(admin + "/metrics", timeout=10).text
        out.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("twlb_balancer_requests_total{")
            )
        )
    return out


@click.command()
@wrk_options(rounds=3, duration=8, connections=64)
@click.option("--threads", default=2, type=click.IntRange(1, 8), show_default=True)
@click.option("--warmup", default=4, type=click.IntRange(0, 60), show_default=True,
              help="Seconds of unmeasured load before each run (a restarted trust balancer "
              "audits new backends at the probation fraction until they are trusted).")  # fmt: skip
@click.option("--replicas", default=os.cpu_count() or 1, type=click.IntRange(1, 16),
              show_default=True, help="Balancer replicas (and nginx workers).")  # fmt: skip
@report_option("replicas_bench.json")
def main(
    rounds: int,
    duration: int,
    connections: int,
    threads: int,
    warmup: int,
    replicas: int,
    out: Path,
) -> None:
    """twlb up's replicas vs nginx (a worker per core): throughput and CPU per request."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        raise click.UsageError("wrk is not installed (Debian: apt-get install -y wrk)")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise click.UsageError("nginx is not installed (Debian: apt-get install -y nginx-light)")
    load_before = os.getloadavg()
    runs: list[dict] = []
    shares: dict[str, list[list[float]]] = {ROUND_ROBIN: [], TRUST: []}
    with tempfile.TemporaryDirectory(prefix="twlb-replicas-bench-") as tmp:
        root = Path(tmp)
        cluster = EmbeddedCluster(
            cluster_spec(replicas, 0.0),
            port_base=free_port_range(8),
            state_dir=root / "state",
            prometheus=False,
            balancer_args=("--access-log-sample", "0", "--log-level", "warning"),
        )
        nginx: ManagedProcess | None = None
        try:
            cluster.start()
            nginx_port = free_port()
            nginx = nginx_process(root, nginx_port, [n.url for n in cluster.nodes], replicas)
            nginx.start().wait_ready(f"http://127.0.0.1:{nginx_port}/healthz", timeout=30)
            targets = {NGINX: f"http://127.0.0.1:{nginx_port}", ROUND_ROBIN: cluster.balancer_url}
            for r in range(1, rounds + 1):
                for name in (NGINX, ROUND_ROBIN, TRUST):
                    if name != NGINX:
                        audits = 0.05 if name == TRUST else 0.0
                        policy = "trust" if name == TRUST else "round-robin"
                        spec = cluster.cluster.spec
                        spec.balancer = spec.balancer.model_copy(update={"audit_fraction": audits})
                        cluster.restart_balancer(policy=policy, ready_timeout=60)
                        time.sleep(1.0)  # the fleet settles (a trust window starts)
                    url = targets.get(name, cluster.balancer_url) + WORK_PATH
                    if warmup:
                        run_wrk(name, r, url, warmup, connections, threads)
                    cpu = tree_cpu_s(nginx.pid) if name == NGINX else replica_cpu_s(cluster)
                    run = run_wrk(name, r, url, duration, connections, threads)
                    spent = (
                        tree_cpu_s(nginx.pid) if name == NGINX else replica_cpu_s(cluster)
                    ) - cpu
                    row = {
                        "server": name, "round": r, "requests_per_s": run.requests_per_s,
                        "requests": run.requests, "non_2xx": run.non_2xx,
                        "socket_errors": run.socket_errors, "latency_avg_ms": run.latency_avg_ms,
                        "cpu_us_per_request": spent / max(run.requests, 1) * 1e6,
                    }  # fmt: skip
                    runs.append(row)
                    if name != NGINX:
                        shares[name].append(replica_requests(cluster))
                    Console(stderr=True).print(
                        f"round {r} {name}: {run.requests_per_s:,.0f} req/s, "
                        f"{row['cpu_us_per_request']:.0f} us CPU/request"
                    )
        finally:
            if nginx is not None:
                nginx.stop()
            cluster.stop()
    summary = {}
    for name in (NGINX, ROUND_ROBIN, TRUST):
        mine = [x for x in runs if x["server"] == name]
        summary[name] = {
            "requests_per_s_median": statistics.median(x["requests_per_s"] for x in mine),
            "cpu_us_per_request_median": statistics.median(x["cpu_us_per_request"] for x in mine),
            "non_2xx": sum(x["non_2xx"] for x in mine),
            "socket_errors": sum(x["socket_errors"] for x in mine),
        }
    ref = summary[NGINX]
    for name in (ROUND_ROBIN, TRUST):
        s = summary[name]
        s["throughput_over_nginx"] = s["requests_per_s_median"] / ref["requests_per_s_median"]
        s["cpu_per_request_over_nginx"] = (
            s["cpu_us_per_request_median"] / ref["cpu_us_per_request_median"]
        )
        # Each replica's share of the requests of each run (restarted replicas start at 0).
        s["replica_shares"] = [
            [round(n / max(sum(run), 1), 3) for n in run] for run in shares[name]
        ]
    table = Table(title=f"{replicas} balancer replicas vs nginx with {replicas} workers")
    for col in ("proxy", "req/s (median)", "x nginx", "CPU us/request", "x nginx"):
        table.add_column(col, justify="left" if col == "proxy" else "right")
    for name, s in summary.items():
        table.add_row(
            name, f"{s['requests_per_s_median']:,.0f}",
            f"{s.get('throughput_over_nginx', 1.0):.2f}", f"{s['cpu_us_per_request_median']:.0f}",
            f"{s.get('cpu_per_request_over_nginx', 1.0):.2f}",
        )  # fmt: skip
    Console().print(table)
    report = {
        "replicas": replicas, "nginx_workers": replicas, "connections": connections,
        "wrk_threads": threads, "duration_s": duration, "warmup_s": warmup, "rounds": rounds,
        "summary": summary, "runs": runs,
    }  # fmt: skip
    write_report(out, report, load_before)


if __name__ == "__main__":
    main()
