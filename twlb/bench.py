"""`twlb bench`: every policy against a matrix of fault scenarios, plus the proxy comparison.

Scenarios (each at a fixed seed and rate, the whole run counted, warm-up included):
all-healthy, one-byzantine, the standard mix (one delay, one error, one byzantine among
six) and the standard mix with a mid-run onset (a healthy node turns byzantine, another
is killed). Targets on the standard mix are checked and written with the figures.
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

from twlb.experiment import (
    DEMO_POLICIES,
    Scenario,
    onset_events,
    rich_table,
    run_phase,
    standard_cluster,
    write_reports,
)
from twlb.procs import free_port_range
from twlb.runtime import EmbeddedCluster, resolve_model
from twlb.spec import TrustCluster

SCENARIOS = ("all-healthy", "one-byzantine", "standard-mix", "onset")


def scenario(name: str, seed: int, rate: float, duration: float) -> Scenario:
    """The named scenario of the matrix, on six nodes."""
    std = standard_cluster("bench", seed=seed)
    if name == "standard-mix":
        return Scenario(name, std, (), rate, duration)
    if name == "onset":
        return Scenario(name, std, onset_events(std, duration), rate, duration)
    doc = std.model_dump(by_alias=True, mode="json")
    if name == "all-healthy":
        doc["spec"]["faultMix"] = []
    elif name == "one-byzantine":
        doc["spec"]["faultMix"] = [{"type": "byzantine", "count": 1}]
    else:
        raise click.BadParameter(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return Scenario(name, TrustCluster.model_validate(doc), (), rate, duration)


def check_targets(summaries: list[dict[str, Any]], scenario_name: str = "standard-mix") -> dict:
    """Issue targets on the standard mix: trust vs oracle, and detection within 10 s."""
    by = {s["policy"]: s for s in summaries if s["scenario"] == scenario_name}
    trust, oracle = by.get("trust"), by.get("oracle")
    if not trust or not oracle:
        return {"checked": False, "why": "needs trust and oracle on the standard mix"}
    checks = {
        "trust_correct_pct>=99.5": trust["correct_pct"] >= 99.5,
        "trust_within_0.3pp_of_oracle": oracle["correct_pct"] - trust["correct_pct"] <= 0.3,
        "trust_p99<=1.5x_oracle": (trust["p99_ms"] or 1e9) <= 1.5 * (oracle["p99_ms"] or 0),
        "every_fault_detected_within_10s": all(
            d["detect_s"] is not None and d["detect_s"] <= 10.0 for d in trust["detections"]
        ),
    }
    return {
        "checked": True,
        "all_met": all(checks.values()),
        "checks": checks,
        "trust": {k: trust[k] for k in ("correct_pct", "p99_ms", "max_detect_s")},
        "oracle": {k: oracle[k] for k in ("correct_pct", "p99_ms")},
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
@click.option("--out", default="reports/bench", type=click.Path(file_okay=False))
@click.option("--seed", default=7, type=click.IntRange(min=0))
@click.option("--rate", default=200.0, type=click.FloatRange(min=1.0, max=5000.0))
@click.option(
    "--duration",
    default=60.0,
    type=click.FloatRange(min=5.0, max=3600.0),
    help="Seconds per scenario and policy.",
)
@click.option(
    "--scenario", "scenarios", multiple=True, default=SCENARIOS, type=click.Choice(SCENARIOS)
)
@click.option(
    "--policy", "policies", multiple=True, default=DEMO_POLICIES, type=click.Choice(DEMO_POLICIES)
)
@click.option(
    "--model",
    "model_choice",
    default="shipped",
    help="Trust model: 'shipped', 'heuristic', or an ONNX file.",
)
@click.option(
    "--proxy/--no-proxy",
    default=True,
    help="Also run the proxy throughput comparison with nginx when installed.",
)
def command(
    out: str, seed: int, rate: float, duration: float, scenarios: tuple[str, ...],
    policies: tuple[str, ...], model_choice: str, proxy: bool,
) -> None:  # fmt: skip
    """Run the scenario x policy matrix and write tables and plots to --out."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    out_dir = Path(out)
    model = resolve_model(model_choice)
    phases = []
    started = time.monotonic()
    total = len(scenarios) * len(policies) * duration
    with Progress(console=console) as progress:
        task = progress.add_task("bench", total=total)
        done = 0.0
        for name in scenarios:
            sc = scenario(name, seed, rate, duration)
            base = free_port_range(sc.cluster.spec.backends + 2)
            with EmbeddedCluster(
                sc.cluster, port_base=base, state_dir=out_dir / "state", model=model
            ) as cl:
                for policy in policies:
                    progress.update(task, description=f"{name} / {policy}")
                    phases.append(
                        run_phase(
                            cl,
                            sc,
                            policy,
                            out_dir / "runs",
                            seed=seed,
                            on_tick=lambda t, d=done: progress.update(
                                task, completed=d + min(t, duration)
                            ),
                        )  # fmt: skip
                    )
                    done += duration
    meta = {"seed": seed, "model": str(model) if model else "heuristic", "rate": rate, "duration_s": duration, "scenarios": list(scenarios),
            "policies": list(policies), "wall_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    summaries = write_reports(out_dir, "bench", phases, "TW-LB policy benchmark", meta)
    targets = check_targets(summaries)
    result: dict[str, Any] = {"targets": targets}
    if proxy:
        result["proxy"] = run_proxy_comparison(out_dir)
    (out_dir / "bench-targets.json").write_text(json.dumps(result, indent=1))
    console.print(rich_table(summaries, "Policies x scenarios"))
    console.print_json(data=targets)
