"""`twlb bench`: policies against a matrix of liar scenarios, plus the proxy comparison.

Every phase is driven by the basic client (cannot verify, never retries), so its
correct/wrong/failed shares are what the balancer delivers; the trust policy is run once
more per scenario with the resilient client, for end-to-end success, reported apart.

Scenarios, on eight backends (each at a fixed seed and rate, the whole run counted,
warm-up included):

- liar-1.0, liar-0.3, liar-0.1, liar-0.02: a delay node, an error node at 0.5 and a
  byzantine node lying on that share of its answers, five benign (3 of 8 faulty);
- colluders: two colluding nodes (one group, the same wrong answer for the same key),
  six benign (2 of 8 faulty);
- onset: the user trial of bench/user_trial.py: delay, error 0.5, byzantine 1.0, byzantine 0.3,
  lie-latency, three benign, one of which turns byzantine after 30% of the run (5 of 8
  faulty by the end);
- all-healthy, standard-mix (six nodes: delay, error, byzantine): on request.

Targets: trust delivers at most 0.2% wrong answers to the basic client where fewer than
half the nodes are faulty, at most 1% where half or more are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from twlb.orchestration.experiment import (
    BASIC,
    DEMO_POLICIES,
    RESILIENT,
    TRIAL_NODES,
    Scenario,
    liar_cluster,
    rich_table,
    run_phase,
    standard_cluster,
    trial_events,
    write_reports,
)
from twlb.orchestration.runtime import EmbeddedCluster, model_option
from twlb.processes.managed import free_port_range

from twlb.options import FiniteFloat, OutputPath

LIAR_RATES = {"liar-1.0": 1.0, "liar-0.3": 0.3, "liar-0.1": 0.1, "liar-0.02": 0.02}
SCENARIOS = (*LIAR_RATES, "colluders", "onset", "all-healthy", "standard-mix")
DEFAULT_SCENARIOS = (*LIAR_RATES, "colluders", "onset")
#: The policies trust is compared with: round-robin, outlier ejection, the oracle.
BENCH_POLICIES = ("trust", "round-robin", "outlier-ejection", "oracle")
#: Audit fraction of the bench's balancers: the bound on a liar's wrong answers before it
#: is proven is about 1/a + 1 (services/balancer/evidence.py); the proxy bench states
#: what it costs in throughput.
BENCH_AUDIT_FRACTION = 0.2
#: Wrong-answer targets for the basic client: fewer than half the nodes faulty, or more.
WRONG_TARGET_PCT = {"minority": 0.2, "half_or_more": 1.0}


def scenario(name: str, seed: int, rate: float, duration: float) -> Scenario:
    """The named scenario of the matrix (eight nodes unless said otherwise)."""
    a = BENCH_AUDIT_FRACTION
    if name in LIAR_RATES:
        nodes = [
            {"type": "delay"},
            {"type": "error", "probability": 0.5},
            {"type": "byzantine", "probability": LIAR_RATES[name]},
        ]
        return Scenario(name, liar_cluster("bench", seed, nodes, audit_fraction=a), (), rate, duration)  # fmt: skip
    if name == "colluders":
        colluder = {"type": "colluding", "collusionGroup": "ring"}
        cluster = liar_cluster("bench", seed, [colluder, colluder], audit_fraction=a)
        return Scenario(name, cluster, (), rate, duration)
    if name == "onset":
        cluster = liar_cluster("bench", seed, TRIAL_NODES, audit_fraction=a)
        return Scenario(name, cluster, trial_events(0.3 * duration), rate, duration)
    if name == "all-healthy":
        return Scenario(name, liar_cluster("bench", seed, [], audit_fraction=a), (), rate, duration)  # fmt: skip
    if name == "standard-mix":
        return Scenario(name, standard_cluster("bench", seed, audit_fraction=a), (), rate, duration)
    raise click.BadParameter(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def faulty_share(sc: Scenario) -> float:
    """Share of the scenario's nodes faulty by its end (its onsets included)."""
    from twlb.spec import assign_faults

    faulty = {a.index for a in assign_faults(sc.cluster.spec) if a.fault.type.value != "benign"}
    faulty |= {ev.node for ev in sc.events}
    return len(faulty) / sc.cluster.spec.backends


def check_targets(summaries: list[dict[str, Any]], shares: dict[str, float]) -> dict:
    """The benchmark's targets: trust's wrong share to the basic client, per scenario."""
    checks: dict[str, Any] = {}
    for s in summaries:
        if s["policy"] != "trust" or s.get("client", BASIC) != BASIC:
            continue
        share = shares[s["scenario"]]
        limit = WRONG_TARGET_PCT["minority" if share < 0.5 else "half_or_more"]
        checks[s["scenario"]] = {
            "faulty_share": round(share, 3),
            "wrong_pct": round(s["wrong_pct"], 4),
            "limit_pct": limit,
            "met": s["wrong_pct"] <= limit,
            "liars": s.get("liars", []),
        }
    return {
        "checked": bool(checks),
        "all_met": bool(checks) and all(c["met"] for c in checks.values()),
        "client": BASIC,
        "checks": checks,
    }


def run_proxy_comparison(out: Path) -> dict[str, Any] | None:
    """The balancer-versus-nginx throughput comparison (bench/proxy_bench.py), if available."""
    script = Path(__file__).resolve().parents[1] / "bench" / "proxy_bench.py"
    if not script.exists() or not shutil.which("nginx") or not shutil.which("wrk"):
        return None
    target = out / "proxy_bench.json"
    subprocess.run([sys.executable, str(script), "--out", str(target)], check=True, timeout=1800)
    return json.loads(target.read_text())


@click.command("bench")
@click.option("--out", default="reports/bench", type=OutputPath(directory=True))
@click.option("--seed", default=7, type=click.IntRange(min=0))
@click.option("--rate", default=150.0, type=FiniteFloat(min=1.0, max=5000.0))
@click.option(
    "--duration",
    default=40.0,
    type=FiniteFloat(min=5.0, max=3600.0),
    help="Seconds per scenario and policy.",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    default=DEFAULT_SCENARIOS,
    type=click.Choice(SCENARIOS),
)
@click.option(
    "--policy", "policies", multiple=True, default=BENCH_POLICIES, type=click.Choice(DEMO_POLICIES)
)
@click.option(
    "--resilient/--no-resilient",
    default=True,
    help="Also run trust with the resilient client per scenario (end-to-end success).",
)
@model_option
@click.option(
    "--proxy/--no-proxy",
    default=True,
    help="Also run the proxy throughput comparison with nginx when installed.",
)
def command(
    out: str, seed: int, rate: float, duration: float, scenarios: tuple[str, ...],
    policies: tuple[str, ...], resilient: bool, model: Path | None, proxy: bool,
) -> None:  # fmt: skip
    """Run the scenario x policy matrix (basic client) and write tables and plots to --out."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    out_dir = Path(out)
    phases = []
    started = time.monotonic()
    runs = [(p, BASIC) for p in policies]
    if resilient and "trust" in policies:
        runs.append(("trust", RESILIENT))
    total = len(scenarios) * len(runs) * duration
    shares: dict[str, float] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("bench", total=total)
        done = 0.0
        for name in scenarios:
            sc = scenario(name, seed, rate, duration)
            shares[name] = faulty_share(sc)
            base = free_port_range(sc.cluster.spec.backends + 2)
            with EmbeddedCluster(
                sc.cluster, port_base=base, state_dir=out_dir / "state", model=model
            ) as cl:
                for policy, client in runs:
                    progress.update(task, description=f"{name} / {policy} / {client}")
                    phases.append(
                        run_phase(
                            cl,
                            sc,
                            policy,
                            out_dir / "runs",
                            seed=seed,
                            client=client,
                            on_tick=lambda t, d=done: progress.update(
                                task, completed=d + min(t, duration)
                            ),
                        )  # fmt: skip
                    )
                    done += duration
    meta = {"seed": seed, "model": str(model) if model else "heuristic", "rate": rate,
            "duration_s": duration, "scenarios": list(scenarios), "policies": list(policies),
            "audit_fraction": BENCH_AUDIT_FRACTION, "client": "basic (resilient: trust only)",
            "command": " ".join(["twlb", *sys.argv[1:]]),
            "wall_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    summaries = write_reports(out_dir, "bench", phases, "TW-LB liar benchmark", meta)
    targets = check_targets(summaries, shares)
    result: dict[str, Any] = {"targets": targets}
    if proxy:
        result["proxy"] = run_proxy_comparison(out_dir)
    (out_dir / "bench-targets.json").write_text(json.dumps(result, indent=1))
    console.print(rich_table(summaries, "Policies x scenarios"))
    console.print_json(data=targets)
