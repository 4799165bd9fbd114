"""Chaos Toolkit probes and actions for gossip failure detection (module `twlb.chaos.gossip`).

`freeze_node` stops a backend's process (SIGSTOP) for a while: to its peers and to the
balancer it is dead (nothing answers), but the embedded runtime, which restarts a killed
node within half a second, leaves it be, so the members have time to agree. `gossip_verdict`
then watches, from the moment it is called, the balancer's `/trust` row of the node:
when the members' verdict reached `dead` with every other member agreeing, and when the
balancer took the node out of rotation, and whether that was the verdict's doing (its
health checks had not yet failed `unhealthy_threshold` times). It works on the embedded
runtime (`state_dir`) and on a cluster (`url` of the balancer, the node's name).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
from chaoslib.exceptions import ActivityFailed
from twlb.chaos.probes import HTTP_TIMEOUT_S, _admin_target, backend_matches
from twlb.chaos.state import load_cluster
from twlb.processes.managed import pid_alive

POLL_S = 0.05


def _signal_node(node: str, state_dir: str | None, sig: signal.Signals) -> dict[str, Any]:
    n = load_cluster(state_dir).node(node)
    if n.pid is None or not pid_alive(n.pid):
        raise ActivityFailed(f"node {n.name} is not running (pid {n.pid})")
    os.kill(n.pid, sig)
    return {"node": n.name, "url": n.url, "pid": n.pid, "at": time.time()}


def freeze_node(node: str, seconds: float = 20.0, state_dir: str | None = None) -> dict[str, Any]:
    """SIGSTOP the node's process now and SIGCONT it after `seconds` (a hung node, seen
    from outside exactly as a dead one). Output as `twlb.chaos.actions`' for labelling."""
    out = _signal_node(node, state_dir, signal.SIGSTOP)
    pid = out["pid"]

    def thaw() -> None:
        time.sleep(seconds)
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)

    threading.Thread(target=thaw, name=f"thaw {node}", daemon=True).start()
    return {**out, "chaos_class": "crash", "frozen_s": seconds}


def thaw_node(node: str, state_dir: str | None = None) -> dict[str, Any]:
    """SIGCONT the node (the rollback; harmless when it already runs)."""
    return {**_signal_node(node, state_dir, signal.SIGCONT), "restored": True}


def _row(client: httpx.Client, target: str, node: str, node_url: str | None) -> dict[str, Any]:
    doc = client.get(target + "/trust").json()
    for row in doc["backends"]:
        if backend_matches(row["url"], node, node_url):
            return row
    raise ActivityFailed(f"the balancer has no backend for node {node}")


def gossip_all_alive(url: str | None = None, state_dir: str | None = None) -> bool:
    """Steady state: the balancer reads every backend alive in every member's view."""
    target = _admin_target(url, state_dir)
    try:
        rows = httpx.get(target + "/trust", timeout=HTTP_TIMEOUT_S).json()["backends"]
    except (httpx.HTTPError, ValueError, KeyError) as err:
        raise ActivityFailed(f"cannot read {target}/trust: {err}") from None
    return all(r.get("gossip", {}).get("verdict") == "alive" for r in rows)


def gossip_verdict(
    node: str,
    within_s: float,
    health_interval_s: float,
    unhealthy_threshold: int,
    url: str | None = None,
    state_dir: str | None = None,
) -> dict[str, Any]:
    """From now: seconds until every other member agrees `node` is dead (`agreed_s`) and
    until the balancer took it out of rotation (`out_s`). Fails unless both happen within
    `within_s`, and the balancer's removal came from the verdict before its checks could
    have done it: (unhealthy_threshold - 1) x health_interval_s after the first failure."""
    target = _admin_target(url, state_dir)
    node_url = None
    if state_dir:
        found = load_cluster(state_dir).node(node)
        node, node_url = found.name, found.url
    t0 = time.monotonic()
    agreed_s = out_s = None
    out_row: dict[str, Any] = {}
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        while time.monotonic() - t0 < within_s and (agreed_s is None or out_s is None):
            try:
                row = _row(client, target, node, node_url)
            except (httpx.HTTPError, ValueError) as err:
                raise ActivityFailed(f"cannot read {target}/trust: {err}") from None
            now = time.monotonic() - t0
            if agreed_s is None and row.get("gossip", {}).get("verdict") == "dead":
                agreed_s = now
            if out_s is None and row.get("up") is False:
                out_s, out_row = now, row
            time.sleep(POLL_S)
    checks_bound_s = (unhealthy_threshold - 1) * health_interval_s
    result = {
        "node": node,
        "agreed_s": agreed_s,
        "out_s": out_s,
        "health_checks_bound_s": checks_bound_s,
        "by_gossip": bool(out_row.get("health", {}).get("gossip_dead")),
        "failed_checks_when_out": out_row.get("health", {}).get("consecutive_failures"),
    }
    if agreed_s is None or out_s is None:
        raise ActivityFailed(f"no agreed verdict and removal within {within_s} s: {result}")
    if not result["by_gossip"] or result["failed_checks_when_out"] >= unhealthy_threshold:
        raise ActivityFailed(f"the balancer's health checks took it out, not gossip: {result}")
    if out_s >= checks_bound_s:
        raise ActivityFailed(f"out after {out_s:.2f} s, not before the checks ({checks_bound_s} s)")
    return result


def gossip_readmitted(
    within_s: float, url: str | None = None, state_dir: str | None = None
) -> float:
    """Seconds until every backend is alive again in every member's view (a thawed or
    replaced node refuted its verdict); fails after `within_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if gossip_all_alive(url, state_dir):
            return round(time.monotonic() - t0, 3)
        time.sleep(POLL_S)
    raise ActivityFailed(f"the members did not readmit every node within {within_s} s")
