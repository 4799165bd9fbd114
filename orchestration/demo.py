"""`twlb demo` (what `make demo` runs): six nodes, every policy in turn, chaos mid-run.

A six-node cluster with a seeded fault mix (one delay, one error, one byzantine) runs on
the embedded runtime. The basic client (it cannot verify an answer and never retries, as
real clients are) drives it through each policy in turn, so the figures are what the
balancer delivers; then the resilient client (verifies, retries) drives the trust policy
once more, for end-to-end success, reported apart. In every phase one healthy node turns
byzantine and another is killed part-way. The result is a comparison table (correct,
wrong and failed shares, latency quantiles, time to take each fault out of rotation),
the wrong answers each liar delivered, and `reports/demo/` with JSON, markdown and PNG
plots.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from twlb.dashboard.screenshot import DelayedScreenshot
from twlb.orchestration.experiment import (
    BASIC,
    DEMO_POLICIES,
    RESILIENT,
    Scenario,
    onset_events,
    rich_table,
    run_phase,
    standard_cluster,
    write_reports,
)
from twlb.orchestration.runtime import EmbeddedCluster, model_option, start_dashboard
from twlb.processes.managed import free_port_range

from twlb.options import FiniteFloat, OutputPath
from twlb.spec import DataPlane

#: The demo balancers' audit fraction (a liar delivers about 1/a + 1 wrong answers before
#: it is proven; services/balancer/evidence.py).
DEMO_AUDIT_FRACTION = 0.2


@click.command("demo")
@click.option(
    "--out",
    default="reports/demo",
    type=OutputPath(directory=True),
    help="Where the JSON, markdown summary and plots go.",
)
@click.option(
    "--seed", default=7, type=click.IntRange(min=0), help="Fault placement and load seed."
)
@click.option(
    "--rate",
    default=100.0,
    type=FiniteFloat(min=1.0, max=2000.0),
    help="Requests per second in each phase.",
)
@click.option(
    "--phase-seconds",
    default=25.0,
    type=FiniteFloat(min=5.0, max=600.0),
    help="Length of each policy's phase.",
)
@click.option(
    "--policy",
    "policies",
    multiple=True,
    default=DEMO_POLICIES,
    type=click.Choice(DEMO_POLICIES),
    help="Policies to run (repeatable).",
)
@click.option(
    "--port-base",
    default=0,
    type=click.IntRange(0, 65000),
    help="Balancer port (0: pick free ports).",
)
@click.option(
    "--envoy/--no-envoy",
    default=True,
    help="One more phase: trust with Envoy routing the traffic, TW-LB its control plane.",
)
@model_option
def command(
    out: str, seed: int, rate: float, phase_seconds: float, policies: tuple[str, ...],
    port_base: int, envoy: bool, model: Path | None,
) -> None:  # fmt: skip
    """Run the six-node demo through every policy and write reports/demo/."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    out_dir = Path(out)
    tc = standard_cluster("demo", seed=seed, audit_fraction=DEMO_AUDIT_FRACTION)
    scenario = Scenario(
        "standard-mix+onset", tc, onset_events(tc, phase_seconds), rate, phase_seconds
    )
    base = port_base or free_port_range(tc.spec.backends + 2)
    cluster = EmbeddedCluster(tc, port_base=base, state_dir=out_dir / "state", model=model)
    started = time.monotonic()
    phases = []
    console.print(
        f"[bold]TW-LB demo[/]: {tc.spec.backends} nodes, seed {seed}, {rate:g} req/s, "
        f"{phase_seconds:g}s per policy, policies: {', '.join(policies)}"
    )
    with cluster:
        page = start_dashboard(cluster)
        console.print(f"  live dashboard while the demo runs: [bold]{cluster.dashboard_url}[/]")
        shot = DelayedScreenshot(page.url, out_dir / "dashboard.png", len(cluster.nodes))
        for n in cluster.nodes:
            console.print(f"  {n.name} {n.url}: {n.fault.type.value} (truth {n.truth.value})")
        for ev in scenario.events:
            console.print(f"  at {ev.at_s:.1f}s in each phase: {ev.label}")
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), console=console, transient=False,
        ) as progress:  # fmt: skip
            balancer, on_envoy = DataPlane.BALANCER, DataPlane.ENVOY
            runs = [(p, BASIC, balancer) for p in policies]
            if envoy:  # the same scenario with Envoy routing, steered by TW-LB
                runs.append(("trust", BASIC, on_envoy))
            if "trust" in policies:
                runs.append(("trust", RESILIENT, balancer))
            for policy, client, plane in runs:
                label = policy if plane is balancer else f"{policy} (envoy)"
                task = progress.add_task(f"{label:<18} {client:<9}", total=phase_seconds)
                if (policy, client, plane) == runs[-1]:  # the page under load, late in the last run
                    shot.start_after(0.6 * phase_seconds)
                phase = run_phase(
                    cluster, scenario, policy, out_dir / "runs", seed=seed, client=client,
                    data_plane=plane,
                    on_tick=lambda t, task=task: progress.update(task, completed=min(t, phase_seconds)),
                )  # fmt: skip
                progress.update(task, completed=phase_seconds)
                phases.append(phase)
        picture = shot.wait()
        page.stop()
    meta = {
        "seed": seed,
        "model": str(model) if model else "heuristic",
        "rate": rate,
        "phase_seconds": phase_seconds,
        "audit_fraction": DEMO_AUDIT_FRACTION,
        "client": "basic (resilient: trust, reported apart)",
        "envoy": "trust (envoy): Envoy routes, TW-LB is its xDS control plane" if envoy else None,
        "nodes": [
            {"name": n.name, "url": n.url, "fault": n.assignment.fault.type.value}
            for n in cluster.nodes
        ],
        "events": [ev.label for ev in scenario.events],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    summaries = write_reports(out_dir, "demo", phases, "TW-LB demo: policies compared", meta)
    console.print(rich_table(summaries, "Policies on the standard mix with mid-run chaos"))
    console.print(
        f"Reports in {out_dir}/: demo.md, demo.json, demo-policies.png, "
        f"demo-trust-weights-*.png ({meta['wall_seconds']}s in all; every process stopped)"
    )
    if picture:
        console.print(f"Dashboard screenshot: {picture}")
    else:
        console.print(f"[yellow]No dashboard screenshot: {shot.problem}[/]")
