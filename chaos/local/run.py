"""Run chaos on an embedded cluster and record what the balancer saw: the one home of it.

The demo and benchmark (orchestration/experiment.py), the collector (orchestration/collect.py) and the chaos
recorder (chaos/local/recorder.py) all do the same few things, defined here once:
- `ChaosEvent` / `ChaosSchedule`: timed events (switch a node's fault, kill it for a
  hold-down) applied to a running `EmbeddedCluster` when their time comes;
- `driven_load`: the load generator (`twlb load`) as a separate process, so the
  measuring client never shares an event loop with what it measures;
- `TrustPoller`: the balancer's `/trust`, polled, noticing each new trust tick;
- `TruthTimeline`, `observe_truth`, `control_truth`: each node's true class over time,
  from the runtime itself or from a node's control endpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from twlb.balancer.features import FEATURE_NAMES
from twlb.processes.managed import ManagedProcess, twlb_argv

from twlb.spec import FaultSpec, NodeClass

Log = Callable[[str], None]


# --------------------------------------------------------------------------- chaos events


@dataclass(frozen=True)
class ChaosEvent:
    """At `at_s` seconds into a run: switch node `node` to `fault`, or, with `fault` None,
    kill it and hold it down for `hold_down_s` before the runtime restarts it."""

    at_s: float
    node: int
    fault: FaultSpec | None = None
    hold_down_s: float = 10.0

    @property
    def action(self) -> str:
        return "kill" if self.fault is None else "fault"

    @property
    def label(self) -> str:
        if self.fault is None:
            return f"kill node-{self.node}"
        return f"node-{self.node} -> {self.fault.type.value}"

    @property
    def onset_class(self) -> NodeClass:
        """The class the node has once the event acted."""
        return NodeClass.CRASH if self.fault is None else self.fault.node_class

    def describe(self) -> dict[str, Any]:
        return {
            "at_s": self.at_s,
            "node": self.node,
            "action": self.action,
            "fault": self.fault.model_dump(mode="json", by_alias=True) if self.fault else None,
            "hold_down_s": self.hold_down_s,
        }


class ChaosSchedule:
    """Events applied to a running cluster (an `EmbeddedCluster`) once they are due."""

    def __init__(self, cluster: Any, events: Iterable[ChaosEvent], log: Log | None = None):
        self.cluster = cluster
        self.pending = sorted(events, key=lambda e: e.at_s)
        self.log = log

    def apply_due(self, elapsed_s: float) -> list[ChaosEvent]:
        """Apply every event due by `elapsed_s` into the run; returns those that acted (a
        kill of a node already down, or a fault switch the node refused, did not)."""
        acted = []
        while self.pending and self.pending[0].at_s <= elapsed_s:
            event = self.pending.pop(0)
            if self._apply(event):
                acted.append(event)
        return acted

    def _apply(self, event: ChaosEvent) -> bool:
        node = self.cluster.node(event.node)
        if event.fault is None:
            if not node.alive:
                return False
            self.cluster.kill_node(event.node, hold_down_s=event.hold_down_s)
            self._say(f"  t+{event.at_s:.1f}s killed {node.name} for {event.hold_down_s:.1f}s")
            return True
        try:
            self.cluster.set_fault(event.node, event.fault)
        except httpx.HTTPError as err:
            self._say(f"  t+{event.at_s:.1f}s could not switch {node.name}: {err}")
            return False
        self._say(f"  t+{event.at_s:.1f}s {node.name} fault -> {event.fault.type.value}")
        return True

    def _say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)


# --------------------------------------------------------------------------- load


@dataclass
class LoadRun:
    """A running `twlb load` process and where its JSON report lands."""

    process: ManagedProcess
    report_path: Path
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.alive()

    def report(self) -> dict[str, Any]:
        """The load generator's report; a clear error with its log's tail if it wrote none."""
        if not self.report_path.exists():
            tail = (
                self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
            )
            raise RuntimeError(f"`twlb load` wrote no report ({self.report_path}): {tail}")
        return json.loads(self.report_path.read_text())


@contextlib.contextmanager
def driven_load(
    url: str,
    rate: float,
    duration_s: float,
    workdir: Path,
    mode: str = "basic",
    seed: int = 0,
    name: str = "load",
) -> Iterator[LoadRun]:
    """Open-loop GET /work on `url` with `twlb load` (`mode` basic or resilient) while the
    block runs, at most `duration_s`; stopped by its pid when the block is left."""
    report = workdir / f"{name}.json"
    log_path = workdir / f"{name}.log"
    argv = twlb_argv(
        "load", "--url", url, "--rate", repr(rate), "--duration", repr(duration_s),
        "--mode", mode, "--seed", str(seed), "--quiet", "--out", str(report),
    )  # fmt: skip
    proc = ManagedProcess(argv, log_path=log_path).start()
    try:
        yield LoadRun(proc, report, log_path)
    finally:
        proc.stop()


# --------------------------------------------------------------------------- /trust


def fleet_features(trust: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """backend URL -> features from a /trust answer (backends without a full row left out)."""
    out = {}
    for b in trust.get("backends", []):
        feats = b.get("features") or {}
        if all(n in feats for n in FEATURE_NAMES):
            out[b["url"]] = {n: float(feats[n]) for n in FEATURE_NAMES}
    return out


class TrustPoller:
    """Polls a balancer's /trust; knows when its last trust tick was seen."""

    def __init__(self, balancer_url: str, timeout_s: float = 2.0) -> None:
        self.url = balancer_url.rstrip("/") + "/trust"
        self.client = httpx.Client(timeout=timeout_s)
        self.last: dict[str, dict[str, float]] = {}
        self.changed_at = 0.0

    def fetch(self) -> dict[str, Any] | None:
        """The whole /trust answer, or None while the balancer does not give one."""
        try:
            r = self.client.get(self.url)
            r.raise_for_status()
            answer = r.json()
        except (httpx.HTTPError, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def poll(self) -> dict[str, dict[str, float]]:
        """Every backend's features now (the last ones seen if /trust does not answer)."""
        answer = self.fetch()
        if answer is None:
            return self.last
        current = fleet_features(answer)
        if current != self.last:
            self.last = current
            self.changed_at = time.time()
        return current

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- ground truth


@dataclass
class TruthTimeline:
    """Each node's true class over time, as (time, class, fault) changes."""

    changes: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)

    def observe(self, node: str, now: float, label: str, fault: str) -> None:
        seq = self.changes.setdefault(node, [])
        if not seq or seq[-1][1:] != (label, fault):
            seq.append((now, label, fault))

    def stable(self, node: str, start: float, end: float) -> tuple[str, str] | None:
        """(class, fault) if it held over the whole of [start, end], else None."""
        seq = self.changes.get(node, [])
        current: tuple[str, str] | None = None
        for t, label, fault in seq:
            if t <= start:
                current = (label, fault)
            elif t <= end:
                return None
        return current


def observe_truth(cluster: Any, truth: TruthTimeline, now: float | None = None) -> None:
    """Record every node's true class now, as the embedded runtime knows it."""
    now = time.time() if now is None else now
    for n in cluster.nodes:
        truth.observe(n.name, now, n.truth.value, n.fault.type.value)


def control_truth(url: str, token: str, client: httpx.Client) -> tuple[str, str]:
    """(class, fault type) of a running backend from GET /control/fault; down is crash."""
    try:
        r = client.get(
            url.rstrip("/") + "/control/fault", headers={"Authorization": f"Bearer {token}"}
        )
    except httpx.HTTPError:
        return NodeClass.CRASH.value, "down"
    if r.status_code in (401, 403):
        raise PermissionError(f"{url}/control/fault refused the control token ({r.status_code})")
    if r.status_code != 200:
        return NodeClass.CRASH.value, "down"
    fault = FaultSpec.model_validate(r.json()["fault"])
    return fault.node_class.value, fault.type.value
