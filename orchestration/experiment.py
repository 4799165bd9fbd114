"""Policy experiments on the embedded runtime: the engine behind `twlb demo` and `twlb bench`.

A scenario is a TrustCluster plus timed chaos events (switch a node's fault, kill a
node). A phase runs one scenario under one policy and one client: reset the nodes to the
scenario's faults, start a fresh balancer with the policy, drive the load generator, apply
the events on time and poll the balancer's `/trust` to see when each fault is detected
(the load, the events and the polling are twlb.chaos.run's). Results are plain dicts,
written as JSON, markdown and PNG plots.

The client is `basic` unless said otherwise: it cannot verify an answer and never
retries, as real clients are, so its correct/wrong/failed shares are what the balancer
itself delivers. The `resilient` client recomputes every digest and retries wrong
answers elsewhere; its figures are end-to-end success, reported apart.

"Detected" means out of that phase's policy's rotation (`runtime.out_of_rotation`):
failing health under every policy, and beyond that ejected by trust under `trust`,
ejected as an outlier under `outlier-ejection`, faulty by the truth under `oracle`. The
trust engine judges every backend under every policy, but a policy that does not route
on it (round robin, ...) keeps sending to a backend it ejected: that is not detected. A
backend the floor keeps in trust's rotation below the ejection threshold is reported as
held, not detected.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twlb.chaos.run import ChaosEvent, ChaosSchedule, TrustPoller, driven_load
from twlb.orchestration.runtime import EmbeddedCluster, out_of_rotation

from twlb.spec import DataPlane, FaultSpec, FaultType, NodeClass, TrustCluster, assign_faults

#: The load generator's modes: the client that cannot verify and never retries (what the
#: balancer delivers), and the one that verifies and retries (end-to-end success).
BASIC, RESILIENT = "basic", "resilient"

#: Policies in the order the demo runs them; the oracle (told the truth) is the ceiling.
DEMO_POLICIES = (
    "trust",
    "outlier-ejection",
    "p2c-ewma",
    "least-connections",
    "round-robin",
    "oracle",
)


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
    client: str = BASIC
    #: What routed the traffic: TW-LB's proxy ("balancer") or Envoy steered by TW-LB.
    data_plane: str = "balancer"
    timeline: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    liars: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sent = max(int(self.load.get("sent", 0)), 1)
        lat = self.load.get("latency_ms", {})
        detect = [d["detect_s"] for d in self.detections if d["detect_s"] is not None]
        return {
            "scenario": self.scenario,
            # A phase on Envoy reads as its own row: "trust (envoy)".
            "policy": self.policy if self.data_plane == "balancer" else f"{self.policy} (envoy)",
            "data_plane": self.data_plane,
            "client": self.client,
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
            "held": sum(d["held_s"] is not None and d["detect_s"] is None for d in self.detections),
            "max_detect_s": max(detect) if detect else None,
            "detections": self.detections,
            "liars": self.liars,
        }


def _flagged(entry: dict[str, Any], policy: str) -> bool:
    """Whether a /trust row shows the backend out of `policy`'s rotation (detected)."""
    return out_of_rotation(entry, policy) is not None


def _held(entry: dict[str, Any], policy: str) -> bool:
    """Below trust's ejection threshold but kept in its rotation by the floor (a trust
    policy's notion: the other policies do not route on trust)."""
    return policy == "trust" and entry.get("held") is True and not _flagged(entry, policy)


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
    client: str = BASIC,
    data_plane: DataPlane = DataPlane.BALANCER,
) -> Phase:
    """Run `scenario` under `policy` on a running cluster, driven by the `client` mode,
    with TW-LB's proxy or an Envoy it steers routing the traffic (`data_plane`); returns
    what was measured."""
    reset_nodes(cluster, scenario)
    cluster.restart_balancer(policy, data_plane=data_plane)
    out_dir.mkdir(parents=True, exist_ok=True)
    phase = Phase(scenario.name, policy, load={}, client=client, data_plane=data_plane.value)
    onsets: dict[str, tuple[float, NodeClass, str]] = {
        n.url: (0.0, n.truth, "from start") for n in cluster.nodes if n.truth != NodeClass.HEALTHY
    }
    schedule = ChaosSchedule(cluster, scenario.events)
    poller = TrustPoller(cluster.admin_url)
    load_run = driven_load(
        cluster.balancer_url, scenario.rate, scenario.duration_s, out_dir,
        mode=client, seed=seed,
        name=f"load-{scenario.name}-{policy}{plane_suffix(data_plane)}-{client}",
    )  # fmt: skip
    with load_run as load:
        t0 = time.monotonic()
        try:
            while load.running:
                now = time.monotonic() - t0
                for ev in schedule.apply_due(now):
                    url = cluster.node(ev.node).url
                    onsets[url] = (now, ev.onset_class, ev.label)
                    phase.events.append({"at_s": round(now, 3), "event": ev.label, "url": url})
                cluster.supervise_once()
                trust = poller.fetch()  # None while the balancer is briefly busy
                if trust is not None:
                    rows = _rows(cluster, trust, policy)
                    phase.timeline.append({"t": round(now, 3), "backends": rows})
                if on_tick:
                    on_tick(now)
                if now > scenario.duration_s + 60:
                    raise TimeoutError(
                        f"load generator overran its {scenario.duration_s}s duration"
                    )
                time.sleep(poll_s)
        finally:
            poller.close()
    phase.load = load.report()
    phase.detections = _detections(phase.timeline, onsets)
    phase.liars = _liars(cluster, phase, onsets)
    return phase


def plane_suffix(data_plane: DataPlane) -> str:
    """How a file name tells a phase on Envoy apart ('' for TW-LB's own proxy)."""
    return "" if data_plane is DataPlane.BALANCER else f"-{data_plane.value}"


def _liars(
    cluster: EmbeddedCluster, phase: Phase, onsets: dict[str, tuple[float, NodeClass, str]]
) -> list[dict[str, Any]]:
    """Per lying backend: wrong answers the client got from it over the phase, when it first
    left rotation, and how often it came back. With no readmission every wrong answer came
    before its ejection."""
    by_node = phase.load.get("wrong_by_node", {})
    out = []
    for url, (_at, cls, label) in onsets.items():
        if cls is not NodeClass.BYZANTINE:
            continue
        node = cluster.node(url)
        out_times, readmitted, was_out = [], 0, False
        for snap in phase.timeline:
            row = next((b for b in snap["backends"] if b["url"] == url), None)
            if row is None:
                continue
            if row["flagged"] and not was_out:
                out_times.append(snap["t"])
            elif was_out and not row["flagged"]:
                readmitted += 1
            was_out = row["flagged"]
        out.append(
            {
                "url": url,
                "fault": f"{node.fault.type.value} p={node.fault.probability:g} ({label})",
                "wrong": int(by_node.get(node.name, 0)),
                "out_at_s": out_times[0] if out_times else None,
                "readmitted": readmitted,
            }
        )
    return out


def _rows(cluster: EmbeddedCluster, trust: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    """The timeline's view of each /trust row under `policy`, with the node's ground truth."""
    return [
        {
            "url": b["url"],
            "weight": b.get("weight"),
            "state": b.get("state"),
            "health": b.get("health"),
            "flagged": _flagged(b, policy),
            "held": _held(b, policy),
            "truth": cluster.node(b["url"]).truth.value,
        }
        for b in trust.get("backends", [])
        if isinstance(b, dict) and "url" in b
    ]


def _detections(
    timeline: list[dict[str, Any]], onsets: dict[str, tuple[float, NodeClass, str]]
) -> list[dict[str, Any]]:
    """For each fault onset, seconds until the balancer first took that backend out of
    rotation (`detect_s`), and until the floor first held it (`held_s`)."""
    out = []
    for url, (at, cls, label) in onsets.items():
        detect = held = None
        for snap in timeline:
            if snap["t"] < at:
                continue
            row = next((b for b in snap["backends"] if b["url"] == url), None)
            if row is None:
                continue
            if held is None and row.get("held"):
                held = round(snap["t"] - at, 2)
            if row["flagged"]:
                detect = round(snap["t"] - at, 2)
                break
        out.append(
            {"url": url, "class": cls.value, "onset": label, "at_s": at, "detect_s": detect,
             "held_s": held}
        )  # fmt: skip
    return out


def standard_cluster(
    name: str = "demo", seed: int = 7, backends: int = 6, audit_fraction: float | None = None
) -> TrustCluster:
    """Six nodes: one delay, one error, one byzantine, the rest benign, placed by seed."""
    spec: dict[str, Any] = {
        "backends": backends,
        "seed": seed,
        "policy": "trust",
        "faultMix": [
            {"type": "delay", "count": 1},
            {"type": "error", "count": 1, "probability": 0.5},
            {"type": "byzantine", "count": 1},
        ],
    }
    if audit_fraction is not None:
        spec["balancer"] = {"auditFraction": audit_fraction}
    return TrustCluster.model_validate(
        {"apiVersion": "twlb.dev/v1alpha1", "kind": "TrustCluster", "metadata": {"name": name},
         "spec": spec}
    )  # fmt: skip


def liar_cluster(
    name: str,
    seed: int,
    nodes: list[dict[str, Any]],
    backends: int = 8,
    audit_fraction: float | None = None,
) -> TrustCluster:
    """`backends` nodes with the given faults pinned on the first indices, the rest benign."""
    spec: dict[str, Any] = {
        "backends": backends,
        "seed": seed,
        "policy": "trust",
        "nodes": [{"index": i, "fault": f} for i, f in enumerate(nodes)],
    }
    if audit_fraction is not None:
        spec["balancer"] = {"auditFraction": audit_fraction}
    return TrustCluster.model_validate(
        {"apiVersion": "twlb.dev/v1alpha1", "kind": "TrustCluster", "metadata": {"name": name},
         "spec": spec}
    )  # fmt: skip


#: The eight backends of the user trial (bench/user_trial.py): a delay node, an error node at 0.5, a
#: byzantine node at 1.0, one that lies on 30% of its answers, a lie-latency node and three
#: benign ones (one of which turns byzantine part-way: `trial_events`).
TRIAL_NODES: list[dict[str, Any]] = [
    {"type": "delay"},
    {"type": "error", "probability": 0.5},
    {"type": "byzantine", "probability": 1.0},
    {"type": "byzantine", "probability": 0.3},
    {"type": "lie-latency", "delayMs": 300},
]


def trial_events(at_s: float = 12.0) -> tuple[ChaosEvent, ...]:
    """The user trial's onset: benign node 5 turns byzantine at `at_s`."""
    return (ChaosEvent(at_s=at_s, node=5, fault=FaultSpec(type="byzantine")),)


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
        "| scenario | policy | client | correct % | wrong % | failed % | p50 ms | p95 ms "
        "| p99 ms | detected | held | slowest detection s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {s['scenario']} | {s['policy']} | {s.get('client', BASIC)} "
        f"| {_fmt(s['correct_pct'], '.2f')} | {_fmt(s['wrong_pct'], '.2f')} "
        f"| {_fmt(s['failed_pct'], '.2f')} | {_fmt(s['p50_ms'])} | {_fmt(s['p95_ms'])} "
        f"| {_fmt(s['p99_ms'])} | {s['detected']}/{s['faults']} | {s.get('held', 0)} "
        f"| {_fmt(s['max_detect_s'])} |"
        for s in summaries
    ]
    return head + "\n".join(rows) + "\n"


def liars_table(summaries: list[dict[str, Any]]) -> str:
    """Per lying backend: wrong answers the client got from it, and when it left rotation."""
    head = (
        "| scenario | policy | client | liar | wrong answers delivered | out of rotation at s "
        "| readmitted |\n|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {s['scenario']} | {s['policy']} | {s.get('client', BASIC)} "
        f"| {liar['url'].rsplit(':', 1)[-1]} {liar['fault']} | {liar['wrong']} "
        f"| {_fmt(liar['out_at_s'])} | {liar['readmitted']} |"
        for s in summaries
        for liar in s.get("liars", [])
    ]
    return head + "\n".join(rows) + "\n"


def rich_table(summaries: list[dict[str, Any]], title: str):
    """The summaries as a terminal table that wraps instead of cutting (twlb/tables.py);
    with one scenario, its name goes in the title instead of a column."""
    from twlb.tables import table

    scenarios = list(dict.fromkeys(s["scenario"] for s in summaries))
    one = len(scenarios) == 1
    if one:
        title = f"{title} ({scenarios[0]})"
    # Two-line headers no wider than the figures under them (see twlb/tables.py).
    numbers = ("correct\n%", "wrong\n%", "failed\n%", "p50\nms", "p95\nms", "p99\nms",
               "detected", "held", "slowest\ndetect s")  # fmt: skip
    names = ("policy", "client") if one else ("scenario", "policy", "client")
    t = table([*names, *((n, "right") for n in numbers)], title=title)
    for s in summaries:
        cells = (s["policy"], s.get("client", BASIC)) if one else (
            s["scenario"], s["policy"], s.get("client", BASIC))  # fmt: skip
        t.add_row(
            *cells, _fmt(s["correct_pct"], ".2f"), _fmt(s["wrong_pct"], ".2f"),
            _fmt(s["failed_pct"], ".2f"), _fmt(s["p50_ms"]), _fmt(s["p95_ms"]),
            _fmt(s["p99_ms"]), f"{s['detected']}/{s['faults']}", str(s.get("held", 0)),
            _fmt(s["max_detect_s"]),
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
    names = [n if s.get("client", BASIC) == BASIC else f"{n}\n({s['client']})"
             for n, s in zip(names, summaries, strict=True)]  # fmt: skip
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
        if p.policy == "trust" and p.client == BASIC and p.data_plane == "balancer":
            plot_weights(p, out / f"{name}-trust-weights-{p.scenario}.png")
    basic = [s for s in summaries if s.get("client", BASIC) == BASIC]
    resilient = [s for s in summaries if s.get("client", BASIC) != BASIC]
    md = [
        f"# {title}\n",
        "",
        "```",
        json.dumps(meta, indent=1),
        "```",
        "",
        "## What the balancer delivers (basic client: cannot verify, never retries)\n",
        markdown_table(basic),
        "\n## Wrong answers each liar delivered (basic client)\n",
        "With no readmission in the phase, every one of them came before the liar left rotation.\n",
        liars_table(basic),
    ]
    if resilient:
        md += [
            "\n## End to end (resilient client: verifies every digest, retries wrong answers)\n",
            markdown_table(resilient),
        ]
    md.append(
        "\nDetections (seconds from fault onset to the node leaving the phase's policy's "
        "rotation: a policy that kept routing to it did not detect it; held: kept in trust's "
        "rotation by the floor, not detected):\n"
    )
    for s in summaries:
        for d in s["detections"]:
            md.append(
                f"- {s['scenario']} / {s['policy']} / {s.get('client', BASIC)}: {d['class']} "
                f"({d['onset']}, at {d['at_s']:.1f}s) on {d['url']}: {_fmt(d['detect_s'])}"
                + (f" (held after {_fmt(d['held_s'])})" if d.get("held_s") is not None else "")
            )
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return summaries
