"""Chaos Toolkit actions on the embedded runtime: kill a node, switch and restore faults.

Each action takes `state_dir` (the `--state-dir` of `twlb up`) and a node by name or
index. Its output says what it did to which node and when, in the shape
`twlb.chaos.journal` reads back from the journal to label training windows:
`{"node", "chaos_class", "at"}` when a node starts misbehaving and
`{"node", "restored": true, "at"}` when it is itself again.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import psutil
from chaoslib.exceptions import ActivityFailed
from twlb.chaos.probes import HTTP_TIMEOUT_S
from twlb.chaos.state import ClusterState, NodeState, load_cluster

from twlb.procs import pid_alive
from twlb.spec import FaultSpec, NodeClass

#: How often recovery is checked while waiting for the runtime to restart a node.
RECOVERY_POLL_S = 0.2


def _is_node_process(pid: int, node: NodeState) -> bool:
    """Whether `pid` is still this node's `twlb backend` (a pid can be reused)."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "backend" in argv and "--node-id" in argv and node.name in argv


def kill_node(node: str, state_dir: str | None = None) -> dict[str, Any]:
    """SIGKILL a node's process (and its process group), as a crash or OOM kill would.
    The runtime restarts it after its back-off."""
    cluster = load_cluster(state_dir)
    n = cluster.node(node)
    if n.pid is None or not pid_alive(n.pid) or not _is_node_process(n.pid, n):
        raise ActivityFailed(f"node {n.name} is not running (pid {n.pid}); nothing to kill")
    # The runtime starts every node in its own session, so its group is the node alone.
    if os.getpgid(n.pid) == n.pid:
        os.killpg(n.pid, signal.SIGKILL)
    else:
        os.kill(n.pid, signal.SIGKILL)
    return {
        "node": n.name,
        "url": n.url,
        "pid": n.pid,
        "chaos_class": NodeClass.CRASH.value,
        "at": time.time(),
    }


def wait_node_recovered(
    node: str, state_dir: str | None = None, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Wait until the runtime has the node running again and answering its health check."""
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    last = "not checked"
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        while time.monotonic() < deadline:
            n = load_cluster(state_dir).node(node)
            if n.pid and pid_alive(n.pid):
                try:
                    r = client.get(n.url + "/healthz")
                    if r.status_code == 200:
                        return {
                            "node": n.name,
                            "pid": n.pid,
                            "restored": True,
                            "at": time.time(),
                            "after_s": round(time.monotonic() - t0, 3),
                        }
                    last = f"health check answered {r.status_code}"
                except httpx.HTTPError as err:
                    last = f"health check failed: {err!r}"
            else:
                last = f"no live process (pid {n.pid})"
            time.sleep(RECOVERY_POLL_S)
    raise ActivityFailed(f"node {node} did not recover within {timeout_s}s ({last})")


def _put_fault(cluster: ClusterState, n: NodeState, fault: FaultSpec) -> dict[str, Any]:
    try:
        r = httpx.put(
            n.url + "/control/fault",
            json=fault.model_dump(mode="json", by_alias=True),
            headers=cluster.control_headers(),
            timeout=HTTP_TIMEOUT_S,
        )
    except httpx.HTTPError as err:
        raise ActivityFailed(f"cannot reach {n.name}'s control endpoint: {err!r}") from None
    if r.status_code != 200:
        raise ActivityFailed(f"{n.name} refused the fault ({r.status_code}): {r.text[:300]}")
    return r.json()


def set_fault(node: str, fault: dict[str, Any], state_dir: str | None = None) -> dict[str, Any]:
    """Switch a node's fault now through its token-protected control endpoint."""
    try:
        spec = FaultSpec.model_validate(fault)
    except ValueError as err:
        raise ActivityFailed(f"invalid fault {fault!r}: {err}") from None
    cluster = load_cluster(state_dir)
    n = cluster.node(node)
    _put_fault(cluster, n, spec)
    out: dict[str, Any] = {
        "node": n.name,
        "url": n.url,
        "fault": spec.model_dump(mode="json", by_alias=True),
        "at": time.time(),
    }
    if spec.node_class is NodeClass.HEALTHY:
        out["restored"] = True
    else:
        out["chaos_class"] = spec.node_class.value
    return out


def restore_fault(node: str, state_dir: str | None = None) -> dict[str, Any]:
    """Give a node back the fault its TrustCluster assigned it (the runtime's record)."""
    cluster = load_cluster(state_dir)
    n = cluster.node(node)
    _put_fault(cluster, n, n.fault)
    return {
        "node": n.name,
        "url": n.url,
        "fault": n.fault.model_dump(mode="json", by_alias=True),
        "restored": True,
        "at": time.time(),
    }
