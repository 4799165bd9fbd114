"""`twlb gossip sim`: the gossip protocols at scale on the simulator's kernel, in
virtual time, deterministic by seed; prints a table and writes JSON and plots."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from twlb.gossip.heartbeat import HEARTBEAT_PROTOCOLS
from twlb.gossip.nodes import PROTOCOLS
from twlb.gossip.swim import SWIM_PROFILES
from twlb.sim.gossip import Scenario, run_scenario, summarize

from twlb.options import FiniteFloat, OutputPath
from twlb.tables import cell, rows_table

#: The heartbeat protocols send their whole table (O(N) per message); SWIM does not.
MAX_NODES = {**{p: 1024 for p in HEARTBEAT_PROTOCOLS}, "swim": 10_000}
METRICS = (
    ("agreement_median_s", "agreement, median (s)"),
    ("agreement_p99_s", "agreement, p99 (s)"),
    ("first_detection_median_s", "first detection, median (s)"),
    ("false_positives_per_node_hour", "false positives / node-hour"),
    ("messages_per_node_s", "messages / node / s"),
    ("bytes_per_node_s", "bytes / node / s"),
)


@click.group()
def command() -> None:
    """Gossip failure detection: simulate the protocols at scale."""


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The rows as a markdown table (the files); the terminal gets `rows_table`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], x: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, label) in zip(axes.flat, METRICS, strict=True):
        for protocol in sorted({r["protocol"] for r in rows}):
            pts = sorted(
                (r[x], r[metric])
                for r in rows
                if r["protocol"] == protocol and r[metric] is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=protocol)
        ax.set_title(label)
        ax.set_xlabel(x)
        if x == "nodes":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


SUMMARY_COLUMNS = (
    "protocol",
    "profile",
    "nodes",
    "loss",
    "slow_fraction",
    "failures",
    "agreed",
    "first_detection_median_s",
    "first_detection_p99_s",
    "agreement_median_s",
    "agreement_p99_s",
    "false_positives",
    "runs_with_false_positives",
    "false_positives_per_node_hour",
    "messages_per_node_s",
    "bytes_per_node_s",
    "cpu_s",
)
#: The columns the terminal shows (summary.md and the JSON keep every one).
TERMINAL_COLUMNS = (
    "protocol",
    "profile",
    "nodes",
    "loss",
    "slow_fraction",
    "agreed",
    "first_detection_p99_s",
    "agreement_p99_s",
    "false_positives",
    "messages_per_node_s",
)
#: Terminal headers of the columns, short words that wrap (the files keep the keys).
HEADERS = {
    "slow_fraction": "slow",
    "first_detection_median_s": "detect p50 s",
    "first_detection_p99_s": "detect p99 s",
    "agreement_median_s": "agree p50 s",
    "agreement_p99_s": "agree p99 s",
    "false_positives": "false verdicts",
    "runs_with_false_positives": "runs with false verdicts",
    "false_positives_per_node_hour": "false pos per node-h",
    "messages_per_node_s": "msgs per node s",
    "bytes_per_node_s": "bytes per node s",
    "dissemination_rounds": "dissem. rounds",
    "analytic_rounds_to_agreement": "analytic rounds",
    "rounds_to_agreement_median": "rounds p50",
}
ROUNDS_COLUMNS = (
    "protocol",
    "nodes",
    "loss",
    "dissemination_rounds",
    "analytic_rounds_to_agreement",
    "rounds_to_agreement_median",
)


@command.command("sim")
@click.option(
    "--protocol",
    "protocols",
    type=click.Choice(PROTOCOLS),
    multiple=True,
    default=("swim",),
    help="Repeat for several.",
)
@click.option(
    "--nodes",
    "node_counts",
    type=click.IntRange(2, 10_000),
    multiple=True,
    default=(10,),
    help="Cluster sizes; repeat for several.",
)
@click.option(
    "--loss",
    "losses",
    type=FiniteFloat(0.0, 0.5),
    multiple=True,
    default=(0.01,),
    help="Packet loss probabilities; repeat for several.",
)
@click.option(
    "--latency",
    type=(FiniteFloat(0.0, 10_000), FiniteFloat(0.0, 10_000)),
    default=(1.0, 5.0),
    help="One-way latency LOW HIGH in ms.",
)
@click.option(
    "--gossip-profile",
    "profile",
    type=click.Choice(SWIM_PROFILES),
    default="twlb",
    help="swim: this project's settings or memberlist's exact DefaultLANConfig.",
)
@click.option("--fail", type=click.IntRange(0, 1000), default=1, help="Nodes killed at --fail-at.")
@click.option(
    "--no-fail", is_flag=True, help="Kill nobody (the same as --fail 0): false positives alone."
)
@click.option("--rejoin", is_flag=True, help="Restart the killed nodes once the verdict is due.")
@click.option(
    "--slow-nodes",
    type=FiniteFloat(0.0, 0.5),
    default=0.0,
    help="Fraction of nodes (rounded) that read every message late by --slow-lag.",
)
@click.option(
    "--slow-lag",
    type=(FiniteFloat(0.0, 60.0), FiniteFloat(0.0, 60.0)),
    default=(0.2, 0.8),
    help="LOW HIGH seconds a slow node reads each message late (uniform).",
)
@click.option(
    "--clock-skew",
    type=FiniteFloat(0.0, 3600.0),
    default=0.0,
    help="Each node's clock off by up to this many seconds, either way.",
)
@click.option(
    "--clock-drift",
    type=FiniteFloat(0.0, 0.1),
    default=0.0,
    help="Each node's clock fast or slow by up to this fraction (1e-4: 100 ppm).",
)
@click.option("--seed", type=int, default=1)
@click.option(
    "--runs",
    type=click.IntRange(1, 1000),
    default=5,
    help="Runs per point, seeds seed..seed+runs-1.",
)
@click.option(
    "--fail-at",
    type=FiniteFloat(0.0, 86_400),
    default=20.0,
    help="Virtual time of the kill (s).",
)
@click.option(
    "--duration",
    type=FiniteFloat(1.0, 86_400),
    default=None,
    help="Virtual seconds per run (default: until the slowest verdict is due).",
)
@click.option("--out", type=OutputPath(directory=True), default=Path("reports/gossip-sim"))
def sim_command(
    protocols: tuple[str, ...],
    node_counts: tuple[int, ...],
    losses: tuple[float, ...],
    latency: tuple[float, float],
    profile: str,
    fail: int,
    no_fail: bool,
    rejoin: bool,
    slow_nodes: float,
    slow_lag: tuple[float, float],
    clock_skew: float,
    clock_drift: float,
    seed: int,
    runs: int,
    fail_at: float,
    duration: float | None,
    out: Path,
) -> None:
    """Simulate each protocol at each N and loss; report time to first detection and to
    full agreement (median, p99), false death verdicts (in all, in how many runs, per
    node-hour), messages and bytes per node per second, and rounds to agreement beside
    the analytic expectation."""
    for name, (low, high) in (("--latency", latency), ("--slow-lag", slow_lag)):
        if low > high:
            raise click.BadParameter(f"LOW {low} is above HIGH {high}", param_hint=name)
    if no_fail:
        given = click.get_current_context().get_parameter_source("fail")
        if fail and given is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--no-fail kills nobody, but --fail asked for {fail}")
        fail = 0
    for protocol in protocols:
        for n in node_counts:
            if n > MAX_NODES[protocol]:
                raise click.BadParameter(
                    f"{protocol} carries the whole table in every message: at most {MAX_NODES[protocol]} nodes, got {n}",
                    param_hint="--nodes",
                )
            if fail >= n:
                raise click.BadParameter(f"cannot kill {fail} of {n} nodes", param_hint="--fail")
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for protocol in protocols:
        for n in node_counts:
            for loss in losses:
                results = []
                for run in range(runs):
                    scn = Scenario(
                        protocol,
                        n,
                        loss=loss,
                        latency_ms=latency,
                        fail=fail,
                        rejoin=rejoin,
                        slow_fraction=slow_nodes,
                        slow_lag_s=slow_lag,
                        seed=seed + run,
                        fail_at=fail_at,
                        duration=duration,
                        profile=profile,
                        clock_skew_s=clock_skew,
                        clock_drift=clock_drift,
                    )
                    results.append(run_scenario(scn))
                summary = summarize(results)
                summaries.append(summary)
                raw.extend(r.as_dict() for r in results)
                click.echo(
                    f"{protocol} N={n} loss={loss}: agreement p99 {cell(summary['agreement_p99_s'])} s, "
                    f"false verdicts {summary['false_positives']} "
                    f"({summary['runs_with_false_positives']} of {runs} runs), "
                    f"{cell(summary['messages_per_node_s'])} msg/node/s, CPU {summary['cpu_s']:.1f} s",
                    err=True,
                )
    console = Console()
    console.print(rows_table(summaries, TERMINAL_COLUMNS, headers=HEADERS))
    rounds = [s for s in summaries if s["protocol"] in ("round-robin", "binary-round-robin")]
    if rounds:
        console.print(
            rows_table(
                rounds,
                ROUNDS_COLUMNS,
                "rounds to agreement (analytic: dissemination rounds + T_fail / interval)",
                HEADERS,
            )
        )
        (out / "rounds.md").write_text(table(rounds, ROUNDS_COLUMNS) + "\n")
    (out / "gossip-sim.json").write_text(
        json.dumps({"summaries": summaries, "runs": raw}, indent=1)
    )
    (out / "summary.md").write_text(table(summaries, SUMMARY_COLUMNS) + "\n")
    if len(node_counts) > 1:
        plot(summaries, "nodes", out / "gossip-vs-nodes.png", "gossip failure detection against N")
    if len(losses) > 1:
        plot(
            summaries,
            "loss",
            out / "gossip-vs-loss.png",
            "gossip failure detection against packet loss",
        )
    click.echo(f"wrote {out}/gossip-sim.json", err=True)
    sys.exit(0)
