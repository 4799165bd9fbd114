"""Policy experiments on the embedded runtime: the engine behind `twlb demo` and `twlb bench`.

A scenario is a TrustCluster plus timed chaos events (switch a node's fault, kill a
node). A phase runs one scenario under one policy: reset the nodes to the scenario's
faults, start a fresh balancer with the policy, drive the resilient load generator
(`twlb load`, a separate process, so the measuring client never shares a core's event
loop with what it measures), apply the events on time, and poll the balancer's `/trust`
to see when each fault is detected. Results are plain dicts, written as JSON, markdown
and PNG plots.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from twlb.procs import twlb_argv
from twlb.runtime import EmbeddedCluster
from twlb.spec import FaultSpec, FaultType, NodeClass, TrustCluster, assign_faults

#: A backend counts as detected (flagged) once the balancer takes it out of rotation: its
#: trust state is ejected or its health is unhealthy. The trust engine and the health
#: checks run under every policy, so detection is the balancer's; only some policies
#: (trust, outlier-ejection, and health for all) act on it.
FLAGGED_STATES = frozenset({"ejected", "unhealthy", "down"})

#: Policies in the order the demo runs them; the oracle (told the truth) is the ceiling.
DEMO_POLICIES = (
    "trust",
    "outlier-ejection",
    "p2c-ewma",
    "least-connections",
    "round-robin",
    "oracle",
)


@dataclass(frozen=True)
class ChaosEvent:
    """At `at_s` seconds into a phase: switch `node` to `fault`, or kill it (`fault` None)."""

    at_s: float
    node: int
    fault: FaultSpec | None = None
    hold_down_s: float = 10.0

    @property
    def label(self) -> str:
        if self.fault is None:
            return f"kill node-{self.node}"
        return f"node-{self.node} -> {self.fault.type.value}"

    @property
    def onset_class(self) -> NodeClass:
        return NodeClass.CRASH if self.fault is None else self.fault.node_class


@dataclass
class Scenario:
    """A cluster and what happens to it, at a fixed seed and rate."""

    name: str
    cluster: TrustCluster
    events: tuple[ChaosEvent, ...] = ()
    rate: float = 100.0
    duration_s: float = 30.0


@dataclass
class Phase:
    """One scenario under one policy, as it ran."""

    scenario: str
    policy: str
    load: dict[str, Any]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sent = max(int(self.load.get("sent", 0)), 1)
        lat = self.load.get("latency_ms", {})
        detect = [d["detect_s"] for d in self.detections if d["detect_s"] is not None]
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "sent": self.load.get("sent", 0),
            "correct_pct": 100.0 * self.load.get("correct", 0) / sent,
            "wrong_pct": 100.0 * self.load.get("wrong", 0) / sent,
            "failed_pct": 100.0 * self.load.get("failed", 0) / sent,
            "achieved_rate": self.load.get("achieved_rate"),
            "p50_ms": lat.get("p50"),
            "p95_ms": lat.get("p95"),
            "p99_ms": lat.get("p99"),
            "faults": len(self.detections),
            "detected": len(detect),
            "max_detect_s": max(detect) if detect else None,
            "detections": self.detections,
        }


def _flagged(entry: dict[str, Any]) -> bool:
    """Whether a /trust row shows the balancer has judged the backend bad: ejected,
    failing health checks, or below the ejection threshold but held in rotation by the
    floor (at most half the fleet out)."""
    health = entry.get("health")
    if isinstance(health, dict):  # /trust gives the health tracker's whole state
        health = health.get("state")
    return (
        entry.get("held") is True
        or str(entry.get("state", "")).lower() in FLAGGED_STATES
        or str(health or "").lower() in FLAGGED_STATES
    )


def reset_nodes(cluster: EmbeddedCluster, scenario: Scenario, timeout: float = 30.0) -> None:
    """Bring every node back to the scenario's initial fault, alive and ready."""
    deadline = time.monotonic() + timeout
    for a in assign_faults(scenario.cluster.spec, cluster.name):
        node = cluster.node(a.index)
        if not node.alive and node.restart.next_start:
            # end a hold-down from the previous phase
            node.restart.next_start = time.monotonic()
        while not node.alive:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} did not come back within {timeout}s")
            cluster.supervise_once()
            time.sleep(0.1)
        assert node.proc is not None
        node.proc.wait_ready(node.url + "/healthz", timeout=max(1.0, deadline - time.monotonic()))
        if node.fault != a.fault:
            cluster.set_fault(a.index, a.fault)


def run_phase(
    cluster: EmbeddedCluster,
    scenario: Scenario,
    policy: str,
    out_dir: Path,
    seed: int = 0,
    on_tick: Callable[[float], None] | None = None,
    poll_s: float = 0.5,
) -> Phase:
    """Run `scenario` under `policy` on a running cluster; returns what was measured."""
    reset_nodes(cluster, scenario)
    cluster.restart_balancer(policy)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_out = out_dir / f"load-{scenario.name}-{policy}.json"
    load_log = out_dir / f"load-{scenario.name}-{policy}.log"
    argv = twlb_argv(
        "load",
        "--url", cluster.balancer_url,
        "--rate", repr(scenario.rate),
        "--duration", repr(scenario.duration_s),
        "--mode", "resilient",
        "--seed", str(seed),
        "--out", str(load_out),
        "--quiet",
    )  # fmt: skip
    with open(load_log, "wb") as log:
        load = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    phase = Phase(scenario.name, policy, load={})
    truth_at_start = {n.url: n.truth for n in cluster.nodes}
    onsets: dict[str, tuple[float, NodeClass, str]] = {
        url: (0.0, cls, "from start")
        for url, cls in truth_at_start.items()
        if cls != NodeClass.HEALTHY
    }
    pending = sorted(scenario.events, key=lambda e: e.at_s)
    client = httpx.Client(timeout=2.0)
    try:
        while load.poll() is None:
            now = time.monotonic() - t0
            while pending and pending[0].at_s <= now:
                ev = pending.pop(0)
                node = cluster.node(ev.node)
                if ev.fault is None:
                    cluster.kill_node(ev.node, hold_down_s=ev.hold_down_s)
                else:
                    cluster.set_fault(ev.node, ev.fault)
                onsets[node.url] = (now, ev.onset_class, ev.label)
                phase.events.append({"at_s": round(now, 3), "event": ev.label, "url": node.url})
            cluster.supervise_once()
            try:
                trust = client.get(cluster.balancer_url + "/trust").json()
                phase.timeline.append(
                    {
                        "t": round(now, 3),
                        "backends": [
                            {
                                "url": b["url"],
                                "weight": b.get("weight"),
                                "state": b.get("state"),
                                "health": b.get("health"),
                                "flagged": _flagged(b),
                                "truth": cluster.node(b["url"]).truth.value,
                            }
                            for b in trust.get("backends", [])
                        ],
                    }
                )
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # the balancer may be briefly busy; the next poll catches up
            if on_tick:
                on_tick(now)
            if now > scenario.duration_s + 60:
                load.kill()
                raise TimeoutError(f"load generator overran its {scenario.duration_s}s duration")
            time.sleep(poll_s)
    finally:
        client.close()
        if load.poll() is None:
            load.kill()
        load.wait(10)
    if not load_out.exists():
        raise RuntimeError(
            f"`twlb load` wrote no report (status {load.returncode}): "
            + load_log.read_text(errors="replace")[-1500:]
        )
    phase.load = json.loads(load_out.read_text())
    phase.detections = _detections(phase.timeline, onsets)
    return phase


def _detections(
    timeline: list[dict[str, Any]], onsets: dict[str, tuple[float, NodeClass, str]]
) -> list[dict[str, Any]]:
    """For each fault onset, seconds until the balancer first flagged that backend."""
    out = []
    for url, (at, cls, label) in onsets.items():
        detect = None
        for snap in timeline:
            if snap["t"] < at:
                continue
            if any(b["url"] == url and b["flagged"] for b in snap["backends"]):
                detect = round(snap["t"] - at, 2)
                break
        out.append({"url": url, "class": cls.value, "onset": label, "at_s": at, "detect_s": detect})
    return out


def standard_cluster(name: str = "demo", seed: int = 7, backends: int = 6) -> TrustCluster:
    """Six nodes: one delay, one error, one byzantine, the rest benign, placed by seed."""
    return TrustCluster.model_validate(
        {
            "apiVersion": "twlb.dev/v1alpha1",
            "kind": "TrustCluster",
            "metadata": {"name": name},
            "spec": {
                "backends": backends,
                "seed": seed,
                "policy": "trust",
                "faultMix": [
                    {"type": "delay", "count": 1},
                    {"type": "error", "count": 1, "probability": 0.5},
                    {"type": "byzantine", "count": 1},
                ],
            },
        }
    )


def onset_events(cluster: TrustCluster, duration_s: float) -> tuple[ChaosEvent, ...]:
    """Mid-run chaos on two nodes that start healthy: one turns byzantine, one is killed."""
    healthy = [a.index for a in assign_faults(cluster.spec) if a.fault.type is FaultType.BENIGN]
    if len(healthy) < 2:
        raise ValueError("onset events need at least two benign nodes")
    return (
        ChaosEvent(at_s=duration_s / 3, node=healthy[0], fault=FaultSpec(type="byzantine")),
        ChaosEvent(at_s=duration_s / 2, node=healthy[1], fault=None, hold_down_s=duration_s / 3),
    )


# ---- reporting ---------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | policy | correct % | wrong % | failed % | p50 ms | p95 ms | p99 ms "
        "| detected | slowest detection s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {s['scenario']} | {s['policy']} | {_fmt(s['correct_pct'], '.2f')} "
        f"| {_fmt(s['wrong_pct'], '.2f')} | {_fmt(s['failed_pct'], '.2f')} | {_fmt(s['p50_ms'])} "
        f"| {_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} | {s['detected']}/{s['faults']} "
        f"| {_fmt(s['max_detect_s'])} |"
        for s in summaries
    ]
    return head + "\n".join(rows) + "\n"


def rich_table(summaries: list[dict[str, Any]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("scenario", "policy", "correct %", "wrong %", "failed %", "p50", "p95", "p99",
                "detected", "max detect s"):  # fmt: skip
        t.add_column(col, justify="right" if col not in ("scenario", "policy") else "left")
    for s in summaries:
        t.add_row(
            s["scenario"], s["policy"], _fmt(s["correct_pct"], ".2f"), _fmt(s["wrong_pct"], ".2f"),
            _fmt(s["failed_pct"], ".2f"), _fmt(s["p50_ms"]), _fmt(s["p95_ms"]), _fmt(s["p99_ms"]),
            f"{s['detected']}/{s['faults']}", _fmt(s["max_detect_s"]),
        )  # fmt: skip
    return t


def plot_weights(phase: Phase, path: Path) -> None:
    """Trust weight of every backend over time, with the chaos events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    urls = sorted({b["url"] for s in phase.timeline for b in s["backends"]})
    for url in urls:
        ts = [s["t"] for s in phase.timeline for b in s["backends"] if b["url"] == url]
        ws = [b["weight"] for s in phase.timeline for b in s["backends"] if b["url"] == url]
        truth = [b["truth"] for s in phase.timeline for b in s["backends"] if b["url"] == url]
        label = f"{url.rsplit(':', 1)[-1]} ({statistics.mode(truth) if truth else '?'})"
        ax.plot(ts, [w if w is not None else float("nan") for w in ws], label=label)
    for ev in phase.events:
        ax.axvline(ev["at_s"], color="grey", linestyle="--", linewidth=1)
        ax.text(ev["at_s"], 1.02, ev["event"], rotation=0, fontsize=7, ha="left")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("trust weight")
    ax.set_ylim(-0.02, 1.1)
    ax.set_title(f"Trust weights: {phase.scenario} under {phase.policy}")
    ax.legend(fontsize=7, loc="lower left", title="backend port (most common truth)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policies(summaries: list[dict[str, Any]], path: Path, title: str) -> None:
    """Correct/wrong/failed shares and p50/p99 latency per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{s['policy']}\n{s['scenario']}" if len({x['scenario'] for x in summaries}) > 1
             else s["policy"] for s in summaries]  # fmt: skip
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, len(names) * 1.1), 4.5))
    x = range(len(names))
    wrong = [s["wrong_pct"] for s in summaries]
    failed = [s["failed_pct"] for s in summaries]
    a1.bar(x, wrong, label="wrong %", color="tab:red")
    a1.bar(x, failed, bottom=wrong, label="failed %", color="tab:orange")
    a1.set_xticks(list(x), names, fontsize=7, rotation=30)
    a1.set_ylabel("% of requests (100 - correct)")
    a1.set_title("Answers that were not correct")
    a1.legend(fontsize=8)
    a2.bar([i - 0.2 for i in x], [s["p50_ms"] or 0 for s in summaries], width=0.4, label="p50")
    a2.bar([i + 0.2 for i in x], [s["p99_ms"] or 0 for s in summaries], width=0.4, label="p99")
    a2.set_xticks(list(x), names, fontsize=7, rotation=30)
    a2.set_ylabel("latency, ms (from scheduled send)")
    a2.set_yscale("log")
    a2.set_title("Latency")
    a2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(
    out: Path, name: str, phases: list[Phase], title: str, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """JSON, markdown and PNG plots of a set of phases into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = [p.summary() for p in phases]
    (out / f"{name}.json").write_text(
        json.dumps(
            {"meta": meta, "summary": summaries, "phases": [p.__dict__ for p in phases]},
            indent=1,
            default=str,
        )
    )
    plot_policies(summaries, out / f"{name}-policies.png", title)
    for p in phases:
        if p.policy == "trust":
            plot_weights(p, out / f"{name}-trust-weights-{p.scenario}.png")
    md = [
        f"# {title}\n",
        "",
        "```",
        json.dumps(meta, indent=1),
        "```",
        "",
        markdown_table(summaries),
    ]
    md.append("\nDetections (seconds from fault onset to the balancer flagging the node):\n")
    for s in summaries:
        for d in s["detections"]:
            md.append(
                f"- {s['scenario']} / {s['policy']}: {d['class']} ({d['onset']}, at "
                f"{d['at_s']:.1f}s) on {d['url']}: {_fmt(d['detect_s'])}"
            )
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return summaries
