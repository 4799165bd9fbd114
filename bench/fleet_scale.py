"""Benchmark: one real `twlb balancer` in front of a fleet of 1,000 backends.

The backends are served by ONE helper process listening on 1,000 loopback ports
(bench/many_backends.py: honest /healthz and /work). The balancer starts empty and every
backend is added through the admin API, as an operator would. Then, in order:

- health: the share of backends in rotation after each of N health intervals, and how
  many were ever taken out (the balancer logs each one);
- idle: the balancer's CPU% with the fleet attached and no traffic;
- trust ticks: compute time per tick and overruns of the tick period, from the
  balancer's own /metrics (`twlb_balancer_trust_tick_*`);
- load: `twlb load --mode basic` at a constant rate (open loop, bounded duration)
  through the balancer: success share and latency as that client measured them, and
  the balancer's CPU% meanwhile.

Figures are printed and written to reports/bench/fleet_scale.json.

    .venv/bin/python bench/fleet_scale.py                       # 1,000 backends, 200 req/s
    .venv/bin/python bench/fleet_scale.py --backends 200 --rate 100
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx
import psutil
from client_support import REPORT_DIR, LoadProcess, machine, start_service, write_json
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from twlb.processes.managed import ManagedProcess

from twlb.options import FiniteFloat

TOKEN = "fleet-scale-bench"
HELPER = Path(__file__).with_name("many_backends.py")


def start_fleet(count: int, log_dir: Path, timeout: float = 180.0) -> tuple[ManagedProcess, list]:
    """The helper process and the ports it listens on (read from its first output line)."""
    log = log_dir / "many_backends.log"
    proc = ManagedProcess([sys.executable, str(HELPER), "--count", str(count)], log_path=log)
    proc.start()
    bound = time.monotonic() + timeout
    while time.monotonic() < bound:
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith('{"ports"'):
                return proc, json.loads(line)["ports"]
        if not proc.alive():
            break
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"the backend helper did not report its ports:\n{log.read_text()[-2000:]}")


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def cpu_percent_over(pid: int, seconds: float) -> float:
    """The process's CPU use over the next `seconds`, in % of one core."""
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return round(100.0 * (cpu_s(pid) - c0) / (time.monotonic() - t0), 1)


def tick_figures(url: str) -> dict[str, Any]:
    """Trust tick count, mean and largest bucket reached, overruns, from /metrics (and how
    long that scrape took: /metrics grows with the fleet)."""
    began = time.monotonic()
    text = httpx.get(url + "/metrics", timeout=120).text
    fig: dict[str, Any] = {
        "metrics_scrape_s": round(time.monotonic() - began, 2),
        "metrics_bytes": len(text),
    }
    for family in text_string_to_metric_families(text):
        if family.name == "twlb_balancer_trust_tick_duration_seconds":
            buckets = []
            for s in family.samples:
                if s.name.endswith("_count"):
                    fig["ticks"] = int(s.value)
                elif s.name.endswith("_sum"):
                    fig["sum_s"] = s.value
                elif s.name.endswith("_bucket"):
                    buckets.append((float(s.labels["le"]), s.value))
            total = fig.get("ticks", 0)
            fig["mean_ms"] = round(1000 * fig["sum_s"] / total, 2) if total else None
            # The smallest bound holding every tick: the slowest tick was at most this.
            fig["max_at_most_ms"] = next(
                (round(1000 * le, 1) for le, n in buckets if n >= total), None
            )
        elif family.name == "twlb_balancer_trust_tick_overruns":
            fig["overruns"] = int(family.samples[0].value)
    return fig


def load_figures(url: str, rate: float, duration: float, log_dir: Path) -> dict[str, Any]:
    """`twlb load --mode basic` at `rate` for `duration` against `url`, as it measured it."""
    args = ["--url", url, "--mode", "basic", "--rate", str(rate), "--duration", str(duration)]
    r = LoadProcess(args, log_dir).start().wait(timeout=duration + 120).report
    return {
        "client": "twlb load --mode basic (separate process, open loop, 1 s try timeout)",
        "url": url,
        "rate": rate,
        "duration_s": duration,
        "sent": r["sent"],
        "correct": r["correct"],
        "failed": r["failed"],
        "failed_by_reason": {k: v for k, v in r["failed_by_reason"].items() if v},
        "success_share": round(r["correct"] / r["sent"], 4) if r["sent"] else None,
        "achieved_rate": r["achieved_rate"],
        "latency_ms": r["latency_ms"],
    }


def step(what: str) -> None:
    Console(stderr=True).print(f"[dim]{time.strftime('%H:%M:%S')} {what}[/dim]")


def health_share(url: str) -> float:
    h = httpx.get(url + "/healthz", timeout=60).json()
    return round(h["backends_up"] / h["backends"], 4) if h["backends"] else 0.0


@click.command()
@click.option("--backends", default=1000, type=click.IntRange(1, 5000), show_default=True)
@click.option("--policy", default="trust", show_default=True)
@click.option("--audits", default=0.05, type=FiniteFloat(0, 1), show_default=True)
@click.option(
    "--intervals", default=10, type=click.IntRange(1, 100), show_default=True,
    help="Health intervals (1 s each) watched after the fleet is added.",
)  # fmt: skip
@click.option("--idle-s", default=10.0, type=FiniteFloat(1, 120), show_default=True)
@click.option("--rate", default=200.0, type=FiniteFloat(1, 5000), show_default=True)
@click.option("--duration", default=20.0, type=FiniteFloat(1, 300), show_default=True)
@click.option("--out", default=REPORT_DIR / "fleet_scale.json", type=click.Path(path_type=Path))
def main(
    backends: int,
    policy: str,
    audits: float,
    intervals: int,
    idle_s: float,
    rate: float,
    duration: float,
    out: Path,
) -> None:
    """A balancer with BACKENDS backends: health, idle CPU, trust ticks, load."""
    report: dict[str, Any] = {"backends": backends, "policy": policy, "audit_fraction": audits}
    with tempfile.TemporaryDirectory(prefix="twlb-fleet-scale-") as tmp:
        log_dir = Path(tmp)
        helper, ports = start_fleet(backends, log_dir)
        balancer = None
        try:
            balancer, url = start_service(
                "balancer", "--admin-token", TOKEN, "--policy", policy,
                "--audit-fraction", str(audits), "--log-level", "warning", log_dir=log_dir,
            )  # fmt: skip
            step(f"adding {backends} backends through the admin API")
            auth = {"Authorization": f"Bearer {TOKEN}"}
            began = time.monotonic()
            with httpx.Client(base_url=url, headers=auth, timeout=30) as admin:
                for port in ports:
                    r = admin.post("/admin/backends", json={"url": f"http://127.0.0.1:{port}"})
                    r.raise_for_status()
            report["admin_add_s"] = round(time.monotonic() - began, 2)

            step(f"watching {intervals} health intervals")
            shares = []
            for _ in range(intervals):
                time.sleep(1.0)
                shares.append(health_share(url))
            log_text = (log_dir / f"balancer-{url.rsplit(':', 1)[1]}.log").read_text()
            report["health"] = {
                "share_up_per_interval": shares,
                "share_up_after": shares[-1],
                "taken_out_of_rotation": log_text.count("out of rotation"),
            }
            step("idle CPU, trust ticks")
            report["idle_cpu_percent"] = cpu_percent_over(balancer.pid, idle_s)
            report["trust_tick_idle"] = tick_figures(url)

            step(f"load at {rate:.0f} req/s for {duration:.0f} s")
            c0, t0 = cpu_s(balancer.pid), time.monotonic()
            report["load"] = load_figures(url, rate, duration, log_dir)
            busy = round(100.0 * (cpu_s(balancer.pid) - c0) / (time.monotonic() - t0), 1)
            report["load"]["balancer_cpu_percent"] = busy
            # The reference in the same run: the same client and rate straight to one of
            # the helper's backends (what the machine and the client cost without the
            # balancer in between).
            step("reference: the same load straight to one backend")
            direct = f"http://127.0.0.1:{ports[0]}"
            report["load_direct_reference"] = load_figures(direct, rate, duration, log_dir)
            report["trust_tick_after_load"] = tick_figures(url)
            report["health"]["share_up_after_load"] = health_share(url)
        finally:
            if balancer is not None:
                balancer.stop()
            helper.stop()
    report["trust_tick_period_s"] = 0.5
    report["machine"] = machine()
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(out, report)

    table = Table(title=f"balancer with {backends} backends ({policy}, audits {audits})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    h, ld, tk = report["health"], report["load"], report["trust_tick_after_load"]
    table.add_row("admin API: add every backend (s)", str(report["admin_add_s"]))
    table.add_row(f"share up after {intervals} health intervals", f"{h['share_up_after']:.1%}")
    table.add_row("backends ever taken out of rotation", str(h["taken_out_of_rotation"]))
    table.add_row("balancer CPU idle (% of a core)", str(report["idle_cpu_percent"]))
    table.add_row("trust tick mean (ms)", str(tk.get("mean_ms")))
    table.add_row("trust tick max at most (ms)", str(tk.get("max_at_most_ms")))
    table.add_row("trust ticks over their 0.5 s period", f"{tk.get('overruns')}/{tk.get('ticks')}")
    table.add_row(f"load {rate:.0f} req/s: success", f"{ld['success_share']:.2%}")
    table.add_row("load: achieved req/s", str(ld["achieved_rate"]))
    table.add_row("load: p50 / p99 ms", f"{ld['latency_ms']['p50']} / {ld['latency_ms']['p99']}")
    table.add_row("balancer CPU under load (% of a core)", str(ld["balancer_cpu_percent"]))
    ref = report["load_direct_reference"]
    table.add_row("reference, straight to one backend: success", f"{ref['success_share']:.2%}")
    table.add_row(
        "reference: p50 / p99 ms", f"{ref['latency_ms']['p50']} / {ref['latency_ms']['p99']}"
    )
    table.add_row("/metrics scrape after load (s)", str(tk.get("metrics_scrape_s")))
    Console().print(table)
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
