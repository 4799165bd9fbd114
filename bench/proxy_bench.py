"""Benchmark: the balancer's proxy against nginx, side by side on the same three backends.

Three benign `twlb backend` nodes (simulation on, as deployed), nginx (Debian's
nginx-light, generated config in a temp dir, run in the foreground, upstream keepalive),
a round-robin balancer without audits and trust balancers at each `--audit-fraction`
(default 5 %, 10 % and 20 %: what audits cost; each audit asks two more backends, and a
split one all of them). wrk (32 connections) drives one proxy at a time, in alternating order for several rounds, and
the medians are compared. Then `twlb load` (a separate process, open loop at a constant
rate, bounded count) measures p50 latency at 500 req/s through the balancer and straight
to a backend. `--memory` instead proxies one million requests through the trust balancer
and reports its resident memory. Figures are printed and written to
reports/bench/proxy_bench.json (or proxy_bench_memory.json).

    .venv/bin/python bench/proxy_bench.py            # throughput and added latency
    .venv/bin/python bench/proxy_bench.py --memory   # RSS after 1,000,000 requests

`--reference-python` names the interpreter of another build (a venv where an older
checkout is installed): its round-robin and 5 % trust balancers run beside this build's in
the same rounds, and the figures add this build's throughput over the reference's, per
round, so a change is judged against the code before it on the same machine and minute.

    git worktree add /tmp/ref <commit> && python3 -m venv /tmp/ref-venv
    /tmp/ref-venv/bin/pip install -r /tmp/ref/requirements.lock
    /tmp/ref-venv/bin/pip install --no-deps -e /tmp/ref
    .venv/bin/python bench/proxy_bench.py --audit-fraction 0.05 \
        --reference-python /tmp/ref-venv/bin/python
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import click
import httpx
import psutil
from backend_throughput import WrkRun, run_wrk, running, wrk_options
from rich.console import Console
from rich.table import Table
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.options import FiniteFloat

WORK_PATH = "/work?key=bench&rounds=1"
NGINX = "nginx"
ROUND_ROBIN = "balancer round-robin"
DEFAULT_AUDIT_FRACTIONS = (0.05, 0.1, 0.2)
#: Throughput over nginx's in the same run that the balancer must keep: what the code
#: before the balancer's split into server, core and API reached on a quiet machine
#: (docs/results.md). Ratios fall on a loaded machine, for both builds alike: run
#: with --reference-python to compare builds in the same rounds.
ROUND_ROBIN_TARGET = 0.76
TRUST_TARGET = 0.74  # trust policy, 5% audits


def trust_name(fraction: float) -> str:
    return f"balancer trust, {100 * fraction:g}% audits"


TRUST = trust_name(0.05)
REFERENCE = "reference "  # prefix of the reference build's rows
BACKEND_DIRECT = "backend direct"
LATENCY_RATE = 500.0

NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
user root;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream backends {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_process(root: Path, port: int, backends: list[str], workers: int) -> ManagedProcess:
    """nginx in the foreground with a generated round-robin keepalive config."""
    # max_fails=0: a connection the simulated network drops must not bench a backend for
    # fail_timeout (nginx would then answer 502 at once and count it as throughput).
    servers = "\n".join(
        f"        server {b.removeprefix('http://')} max_fails=0;" for b in backends
    )
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, root=root, servers=servers, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return ManagedProcess([nginx, "-p", str(root), "-c", str(conf), "-e", "stderr"],
                          log_path=root / "nginx.log")  # fmt: skip


def balancer_process(
    log_dir: Path,
    port: int,
    backends: list[str],
    policy: str,
    audits: float,
    python: str | None = None,
) -> ManagedProcess:
    """This build's balancer, or the one installed for the interpreter `python`."""
    argv = (twlb_argv if python is None else partial(reference_argv, python))(
        "balancer", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
        "--audit-fraction", str(audits), "--log-level", "warning",
        *(arg for b in backends for arg in ("--backend", b)),
    )  # fmt: skip
    if python is None:  # this build logs every request by default; nginx here does not
        argv += ["--access-log-sample", "0"]
    return ManagedProcess(argv, log_path=log_dir / f"balancer-{port}.log")


def reference_argv(python: str, *args: str) -> list[str]:
    """argv of the `twlb` command of another build, run by that build's interpreter."""
    return [python, "-P", "-m", "twlb", *args]


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process and its children (nginx's workers)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def measure(
    name: str, proc: ManagedProcess, round_: int, url: str, duration: int, conns: int, threads: int
) -> WrkRun:
    """One wrk run plus the CPU the proxy (with its children) spent per answered request."""
    before = tree_cpu_s(proc.pid)
    run = run_wrk(name, round_, url, duration, conns, threads)
    run.server_cpu_us_per_request = (tree_cpu_s(proc.pid) - before) / max(run.requests, 1) * 1e6
    return run


def requests_total(url: str) -> float:
    """Client requests a balancer has answered, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("twlb_balancer_requests_total{")
    )


def load_p50_ms(url: str, duration: float, out: Path) -> dict:
    """`twlb load` at LATENCY_RATE in its own process; returns its JSON report."""
    count = int(LATENCY_RATE * duration)
    argv = twlb_argv(
        "load", "--url", url, "--rate", str(LATENCY_RATE), "--duration", str(duration),
        "--count", str(count), "--mode", "basic", "--timeout", "2", "--quiet", "--out", str(out),
    )  # fmt: skip
    subprocess.run(argv, check=True, timeout=duration + 60, capture_output=True)
    return json.loads(out.read_text())


def machine(load_before: tuple[float, float, float]) -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def write_report(out: Path, report: dict, load_before: tuple[float, float, float]) -> None:
    """`report` with the machine and the time it finished, as JSON in `out`."""
    report["machine"] = machine(load_before)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    Console().print(f"wrote {out}")


@click.command()
@wrk_options(rounds=3, duration=5, connections=32)
@click.option("--threads", default=1, type=click.IntRange(1, 8), show_default=True,
              help="wrk threads.")  # fmt: skip
@click.option("--nginx-workers", default=1, type=click.IntRange(1, 8), show_default=True,
              help="nginx worker processes (the balancer is one process).")  # fmt: skip
@click.option("--latency-duration", default=6.0, type=FiniteFloat(1, 60), show_default=True,
              help="Seconds of each 500 req/s latency run.")  # fmt: skip
@click.option(
    "--memory",
    is_flag=True,
    help="Proxy --memory-requests through the trust balancer and report its RSS.",
)
@click.option("--memory-requests", default=1_000_000, type=click.IntRange(1000), show_default=True)
@click.option("--memory-max-s", default=900, type=click.IntRange(10), show_default=True,
              help="Give up the memory run after this many seconds.")  # fmt: skip
@click.option(
    "--audit-fraction",
    "audit_fractions",
    multiple=True,
    default=DEFAULT_AUDIT_FRACTIONS,
    type=FiniteFloat(0.0, 1.0),
    show_default=True,
    help="Audit fractions of the trust balancers compared (repeatable; 0.05 always runs).",
)
@click.option(
    "--reference-python",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Interpreter of another build whose round-robin and 5% trust balancers run "
    "beside this build's in the same rounds.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON report [default: reports/bench/proxy_bench(_memory).json].",
)
def main(
    rounds: int,
    duration: int,
    connections: int,
    threads: int,
    nginx_workers: int,
    latency_duration: float,
    memory: bool,
    memory_requests: int,
    memory_max_s: int,
    audit_fractions: tuple[float, ...],
    reference_python: str | None,
    out: Path | None,
) -> None:
    """Balancer vs nginx throughput, added latency at 500 req/s, or memory (--memory)."""
    # Stopped by SIGTERM or SIGINT (even when started in the background), the finally below
    # still stops every process this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if shutil.which("wrk") is None:
        raise click.UsageError("wrk is not installed (Debian: apt-get install -y wrk)")
    if not memory and shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise click.UsageError("nginx is not installed (Debian: apt-get install -y nginx-light)")
    out = out or Path(f"reports/bench/proxy_bench{'_memory' if memory else ''}.json")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="twlb-proxy-bench-") as tmp:
        root = Path(tmp)
        backends = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
        procs: dict[str, ManagedProcess] = {
            f"backend {i}": ManagedProcess(
                twlb_argv(
                    "backend",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    b.rsplit(":", 1)[1],
                    "--node-id",
                    f"bench-{i}",
                    "--seed",
                    str(i),
                    "--log-level",
                    "warning",
                ),
                log_path=root / f"backend-{i}.log",
            )  # fmt: skip
            for i, b in enumerate(backends)
        }
        urls = {f"backend {i}": b for i, b in enumerate(backends)}
        fractions = sorted({0.05, *audit_fractions})
        trusts = {trust_name(f): f for f in fractions}
        proxies = [TRUST] if memory else [NGINX, ROUND_ROBIN, *trusts]
        if reference_python is not None and not memory:
            proxies += [REFERENCE + ROUND_ROBIN, REFERENCE + TRUST]
        for name in proxies:
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            if name == NGINX:
                procs[name] = nginx_process(root, port, backends, nginx_workers)
            else:
                own = name.removeprefix(REFERENCE)
                policy, audits = (
                    ("round-robin", 0.0) if own == ROUND_ROBIN else ("trust", trusts[own])
                )
                python = reference_python if name.startswith(REFERENCE) else None
                procs[name] = balancer_process(root, port, backends, policy, audits, python)
        with running(procs, {name: urls[name] + "/healthz" for name in procs}):
            if memory:
                report = memory_run(urls[TRUST], procs[TRUST], memory_requests, memory_max_s)
            else:
                report = speed_run(
                    urls, procs, proxies, root, rounds, duration, connections, threads,
                    latency_duration,
                )  # fmt: skip
                report["nginx_workers"] = nginx_workers
    write_report(out, report, load_before)


def speed_run(
    urls: dict[str, str],
    procs: dict[str, ManagedProcess],
    proxies: list[str],
    root: Path,
    rounds: int,
    duration: int,
    connections: int,
    threads: int,
    latency_duration: float,
) -> dict:
    runs: list[WrkRun] = []
    for name in proxies:  # warm-up (connections, caches), not recorded
        run_wrk(name, 0, urls[name] + WORK_PATH, 2, connections, threads)
    for r in range(1, rounds + 1):
        # Rotate the order so drift (other load on the machine) hits every proxy alike.
        order = proxies[r % len(proxies) :] + proxies[: r % len(proxies)]
        for name in order:
            runs.append(
                measure(
                    name, procs[name], r, urls[name] + WORK_PATH, duration, connections, threads
                )
            )

    def of(name: str, attr: str) -> list[float]:
        if attr == "ok_per_s":  # answered 2xx/3xx per second: fast errors are not throughput
            return [x.ok_per_s for x in runs if x.server == name]
        return [getattr(x, attr) for x in runs if x.server == name]

    median = {name: statistics.median(of(name, "ok_per_s")) for name in proxies}
    cpu = {name: statistics.median(of(name, "server_cpu_us_per_request")) for name in proxies}

    def paired(name: str, over: str = NGINX) -> float:
        # Runs of one round are close in time, so per-round ratios are the least disturbed.
        return statistics.median(
            b / a for a, b in zip(of(over, "ok_per_s"), of(name, "ok_per_s"), strict=True)
        )

    rr_ratio, trust_ratio = paired(ROUND_ROBIN), paired(TRUST)
    by_fraction = {
        name.split(", ")[1]: round(paired(name), 4)
        for name in proxies
        if name.startswith("balancer trust")
    }
    # This build over the reference build, per policy (present with --reference-python).
    over_reference = {
        name: round(paired(name, REFERENCE + name), 4)
        for name in (ROUND_ROBIN, TRUST)
        if REFERENCE + name in proxies
    }

    latency: dict[str, list[float]] = {ROUND_ROBIN: [], BACKEND_DIRECT: []}
    for i, name in enumerate(latency):  # warm-up (connections, the nodes' caches)
        url = urls[ROUND_ROBIN] if name == ROUND_ROBIN else urls["backend 0"]
        load_p50_ms(url, 2.0, root / f"load-warmup-{i}.json")
    for r in range(1, rounds + 1):
        order = [ROUND_ROBIN, BACKEND_DIRECT] if r % 2 else [BACKEND_DIRECT, ROUND_ROBIN]
        for name in order:
            url = urls[ROUND_ROBIN] if name == ROUND_ROBIN else urls["backend 0"]
            rep = load_p50_ms(url, latency_duration, root / f"load-{r}-{len(latency[name])}.json")
            latency[name].append(rep["latency_ms"]["p50"])
    p50 = {name: statistics.median(v) for name, v in latency.items()}
    # Per-round differences (the two runs of a round are back to back), then their median.
    added_p50 = statistics.median(
        b - d for b, d in zip(latency[ROUND_ROBIN], latency[BACKEND_DIRECT], strict=True)
    )

    table = Table(title=f"GET {WORK_PATH}, wrk -t{threads} -c{connections} -d{duration}s")
    for col in ("proxy", "round", "req/s", "non-2xx", "socket err", "avg ms", "proc CPU us/req"):
        table.add_column(col, justify="left" if col == "proxy" else "right")
    for x in runs:
        table.add_row(
            x.server, str(x.round), f"{x.requests_per_s:,.0f}", str(x.non_2xx),
            str(x.socket_errors), f"{x.latency_avg_ms:.2f}", f"{x.server_cpu_us_per_request:.0f}",
        )  # fmt: skip
    console = Console(width=120)
    console.print(table)
    figures = Table(title="Figures (medians)")
    for col in ("figure", "value", "target", "met"):
        figures.add_column(col)
    rows = [
        (
            "round-robin / nginx throughput",
            f"{rr_ratio:.3f}",
            f">= {ROUND_ROBIN_TARGET}",
            rr_ratio >= ROUND_ROBIN_TARGET,
        ),
        (
            "trust 5% audits / nginx throughput",
            f"{trust_ratio:.3f}",
            f">= {TRUST_TARGET}",
            trust_ratio >= TRUST_TARGET,
        ),
        *(
            (f"trust {k} / nginx throughput", f"{v:.3f}", "", True)
            for k, v in by_fraction.items()
            if k != "5% audits"
        ),
        *(
            (f"reference {k} / nginx throughput", f"{paired(REFERENCE + k):.3f}", "", True)
            for k in over_reference
        ),
        *(
            (f"{k} / reference build", f"{v:.3f}", ">= 1.0", v >= 1.0)
            for k, v in over_reference.items()
        ),
        ("added p50 latency at 500 req/s", f"{added_p50:.3f} ms", "< 1 ms", added_p50 < 1.0),
    ]
    for fig, value, target, met in rows:
        figures.add_row(fig, value, target or "-", ("yes" if met else "NO") if target else "-")
    console.print(figures)
    console.print(
        "median 2xx req/s: "
        + ", ".join(f"{n} {median[n]:,.0f}" for n in proxies)
        + f"; p50 at {LATENCY_RATE:.0f} req/s: balancer {p50[ROUND_ROBIN]:.3f} ms, "
        f"direct {p50[BACKEND_DIRECT]:.3f} ms"
    )
    return {
        "benchmark": "proxy_bench",
        "path": WORK_PATH,
        "wrk": {
            "threads": threads,
            "connections": connections,
            "duration_s": duration,
            "rounds": rounds,
        },  # fmt: skip
        "ok_requests_per_s": median,
        "server_cpu_us_per_request": cpu,
        "round_robin_over_nginx": rr_ratio,
        "trust_over_nginx": trust_ratio,
        "trust_over_nginx_by_audits": by_fraction,
        "over_reference_build": over_reference,
        "latency_rate_per_s": LATENCY_RATE,
        "p50_ms": p50,
        "p50_ms_runs": latency,
        "added_p50_ms": added_p50,
        "targets": {
            "round_robin_over_nginx": ROUND_ROBIN_TARGET,
            "trust_over_nginx": TRUST_TARGET,
            "added_p50_ms": 1.0,
        },
        "meets_targets": {
            "round_robin_over_nginx": rr_ratio >= ROUND_ROBIN_TARGET,
            "trust_over_nginx": trust_ratio >= TRUST_TARGET,
            "added_p50_ms": added_p50 < 1.0,
        },
        "runs": [asdict(x) for x in runs],
    }


def memory_run(url: str, proc: ManagedProcess, target: int, max_s: int) -> dict:
    """Drive wrk in 20 s slices until the balancer has answered `target` requests."""
    ps = psutil.Process(proc.pid)
    rss_start = ps.memory_info().rss
    started = time.monotonic()
    samples = []
    console = Console()
    while (done := requests_total(url)) < target:
        if time.monotonic() - started > max_s:
            raise click.ClickException(f"only {done:,.0f} requests after {max_s} s")
        run_wrk(TRUST, len(samples) + 1, url + WORK_PATH, 20, 32, 1)
        rss = ps.memory_info().rss
        samples.append({"requests": requests_total(url), "rss_bytes": rss})
        console.print(f"{samples[-1]['requests']:>12,.0f} requests  RSS {rss / 2**20:7.1f} MiB")
    rss_end = ps.memory_info().rss
    mib = rss_end / 2**20
    table = Table(title="Trust balancer (5% audits) resident memory")
    for col in ("requests", "RSS start MiB", "RSS end MiB", "target", "met"):
        table.add_column(col)
    table.add_row(
        f"{done:,.0f}", f"{rss_start / 2**20:.1f}", f"{mib:.1f}", "< 150 MB",
        "yes" if rss_end < 150e6 else "NO",
    )  # fmt: skip
    console.print(table)
    return {
        "benchmark": "proxy_bench_memory",
        "requests": done,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_end_mib": mib,
        "target_bytes": 150e6,
        "meets_target": rss_end < 150e6,
        "elapsed_s": time.monotonic() - started,
        "samples": samples,
    }


if __name__ == "__main__":
    main()
