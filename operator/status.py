"""A TrustCluster's status from what was observed: Deployments, the balancer's /trust, the spec.

Pure: given the spec, the live Deployments, a trust reading and the previous status, it
returns the new status (phase, conditions, counts, per-node view). Timestamps come in as
`now`; a condition keeps its lastTransitionTime while its status does not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from twlb.operator.render import (
    COMPONENT_BACKEND,
    COMPONENT_BALANCER,
    LABEL_COMPONENT,
    Owner,
    balancer_name,
    selector_string,
    service_url,
)

from twlb.spec import NodeClass, TrustClusterSpec, assign_faults

PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_DEGRADED = "Degraded"
PHASE_INVALID = "Invalid"


@dataclass(frozen=True)
class TrustReading:
    """One read of the balancer's `/trust`: its backends, or why there are none."""

    url: str
    read_at: datetime
    backends: Sequence[Mapping[str, Any]] | None = None
    error: str | None = None


def deployment_ready(dep: Mapping[str, Any]) -> bool:
    status = dep.get("status") or {}
    return int(status.get("readyReplicas") or 0) >= 1


def _stamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    old: Mapping[str, Any] | None,
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """A status condition; its transition time moves only when its status flips."""
    status = "True" if ok else "False"
    old_cond = next((c for c in (old or {}).get("conditions") or [] if c.get("type") == type_), {})
    since = old_cond.get("lastTransitionTime") if old_cond.get("status") == status else None
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or _stamp(now),
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def node_of_url(url: str, names: set[str]) -> str | None:
    """The node behind a backend URL when its host is that node's Service."""
    host = urlsplit(url).hostname or ""
    first = host.split(".", 1)[0]
    return first if first in names else None


def invalid_status(
    message: str, old: Mapping[str, Any] | None, generation: int | None, now: datetime
) -> dict[str, Any]:
    """The status of a TrustCluster whose spec the model rejects."""
    return {
        "phase": PHASE_INVALID,
        "message": message,
        "observedGeneration": generation,
        "conditions": [
            condition(old, "Ready", False, "InvalidSpec", message, generation, now),
            condition(old, "Degraded", True, "InvalidSpec", message, generation, now),
        ],
    }


def summarize(
    owner: Owner,
    spec: TrustClusterSpec,
    deployments: Sequence[Mapping[str, Any]],
    trust: TrustReading | None,
    old: Mapping[str, Any] | None,
    generation: int | None,
    threshold: float,
    now: datetime,
) -> dict[str, Any]:
    """The full status; with `trust` None the previous trust fields are kept."""
    old = old or {}
    by_name = {d["metadata"]["name"]: d for d in deployments}
    assignments = assign_faults(spec, owner.name)
    names = {a.name for a in assignments}
    balancer = by_name.get(balancer_name(owner))
    balancer_ready = bool(
        balancer
        and balancer["metadata"].get("labels", {}).get(LABEL_COMPONENT) == COMPONENT_BALANCER
        and deployment_ready(balancer)
    )

    if trust is None:
        trust_rows = list(old.get("trust") or [])
        trust_read_at, trust_error = old.get("trustReadAt"), old.get("trustError")
        trust_url = old.get("balancerUrl")
    else:
        trust_rows = []
        for b in trust.backends or []:
            url = str(b.get("url", ""))
            weight = b.get("weight")
            trust_rows.append(
                {
                    "url": url,
                    "node": node_of_url(url, names),
                    "weight": weight,
                    "state": b.get("state"),
                    "suspected": weight is not None and float(weight) < threshold,
                }
            )
        trust_read_at, trust_error = _stamp(trust.read_at), trust.error
        trust_url = trust.url
    known = trust is not None and trust.backends is not None
    suspected: int | None
    if known:
        suspected = sum(1 for r in trust_rows if r["suspected"])
    elif trust is None:
        suspected = old.get("suspected")
    else:
        suspected = None
    trust_by_node = {r["node"]: r for r in trust_rows if r.get("node")}

    nodes = []
    ready = 0
    for a in assignments:
        dep = by_name.get(a.name)
        is_ready = bool(dep and deployment_ready(dep))
        ready += is_ready
        row = trust_by_node.get(a.name, {})
        nodes.append(
            {
                "name": a.name,
                "index": a.index,
                "fault": a.fault.type.value,
                "class": a.fault.node_class.value,
                "ready": is_ready,
                "url": service_url(owner, a.name),
                "trust": row.get("weight"),
                "state": row.get("state"),
                "suspected": bool(row.get("suspected")),
            }
        )
    faulty = sum(1 for a in assignments if a.fault.node_class is not NodeClass.HEALTHY)

    all_ready = balancer_ready and ready == spec.backends
    degraded_reasons = []
    if suspected:
        degraded_reasons.append(f"{suspected} backend(s) trusted below {threshold}")
    if balancer_ready and ready < spec.backends:
        degraded_reasons.append(f"{spec.backends - ready} backend(s) not ready")
    if degraded_reasons:
        phase = PHASE_DEGRADED
    elif all_ready:
        phase = PHASE_RUNNING
    else:
        phase = PHASE_PENDING
    ready_msg = f"{ready}/{spec.backends} backends ready, balancer " + (
        "ready" if balancer_ready else "not ready"
    )
    return {
        "phase": phase,
        "message": "; ".join(degraded_reasons) or ready_msg,
        "observedGeneration": generation,
        "backends": spec.backends,
        "readyBackends": ready,
        "balancerReady": balancer_ready,
        "selector": selector_string(owner, COMPONENT_BACKEND),
        "faulty": faulty,
        "suspected": suspected,
        "trustThreshold": threshold,
        "trustReadAt": trust_read_at,
        "trustError": trust_error,
        "balancerUrl": trust_url,
        "conditions": [
            condition(
                old,
                "Ready",
                all_ready,
                "AllReady" if all_ready else "NotReady",
                ready_msg,
                generation,
                now,
            ),
            condition(
                old,
                "Degraded",
                bool(degraded_reasons),
                "Suspected" if suspected else ("NotReady" if degraded_reasons else "Healthy"),
                "; ".join(degraded_reasons) or "no backend suspected",
                generation,
                now,
            ),
        ],
        "nodes": nodes,
        "trust": trust_rows,
    }
