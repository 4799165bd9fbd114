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
import threading
import time
from typing import Any

import httpx
import psutil
from chaoslib.exceptions import ActivityFailed
from twlb.chaos.probes import HTTP_TIMEOUT_S
from twlb.chaos.state import ClusterState, NodeState, load_cluster
from twlb.processes.managed import pid_alive

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
    _sigkill(n.pid)
    done = {
        "node": n.name,
        "url": n.url,
        "pid": n.pid,
        "chaos_class": NodeClass.CRASH.value,
        "at": time.time(),
    }
    return cluster.record("kill_node", done)


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
    return cluster.record("set_fault", out)


def restore_fault(node: str, state_dir: str | None = None) -> dict[str, Any]:
    """Give a node back the fault its TrustCluster assigned it (the runtime's record)."""
    cluster = load_cluster(state_dir)
    n = cluster.node(node)
    _put_fault(cluster, n, n.fault)
    done = {
        "node": n.name,
        "url": n.url,
        "fault": n.fault.model_dump(mode="json", by_alias=True),
        "restored": True,
        "at": time.time(),
    }
    return cluster.record("restore_fault", done)


# ---------------------------------------------------------------- the balancer

#: Balancer kills made by this process (one `chaos run`), as `balancer_recovered` reads
#: them back: {"pid", "restarts_before", "at" or "error"}.
_balancer_kills: list[dict[str, Any]] = []
_balancer_kills_lock = threading.Lock()


def _is_balancer_process(pid: int) -> bool:
    """Whether `pid` is still a `twlb balancer` (a pid can be reused)."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "balancer" in argv and "--port" in argv


def _sigkill(pid: int) -> None:
    # The runtime starts every process in its own session, so its group is it alone.
    if os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)


def _running_balancer(cluster: ClusterState) -> int:
    pid = cluster.balancer_pid
    if pid is None or not pid_alive(pid) or not _is_balancer_process(pid):
        raise ActivityFailed(f"the balancer is not running (pid {pid}); nothing to kill")
    return pid


def kill_balancer(state_dir: str | None = None, delay_s: float = 0.0) -> dict[str, Any]:
    """SIGKILL the balancer's process `delay_s` from now (at once when 0), by its pid in the
    state file; the runtime restarts it after its back-off. A delayed kill returns at once,
    so the after-hypothesis that follows measures the steady state across the kill;
    `balancer_recovered` then says whether it happened and the balancer came back."""
    cluster = load_cluster(state_dir)
    pid = _running_balancer(cluster)
    kill = {"pid": pid, "restarts_before": cluster.balancer_restarts}
    with _balancer_kills_lock:
        _balancer_kills.append(kill)

    def fire() -> None:
        try:
            if not (pid_alive(pid) and _is_balancer_process(pid)):
                raise ProcessLookupError(f"pid {pid} is no longer the balancer")
            _sigkill(pid)
            kill["at"] = time.time()
        except OSError as err:
            kill["error"] = f"cannot kill the balancer (pid {pid}): {err}"

    out = {"balancer": cluster.balancer_url, "pid": pid, "kill_at": time.time() + delay_s}
    cluster.record("kill_balancer", out)
    if delay_s <= 0:
        fire()
        if "error" in kill:
            raise ActivityFailed(kill["error"])
        return out
    timer = threading.Timer(delay_s, fire)
    timer.daemon = True
    kill["timer"] = timer
    timer.start()
    return out


def balancer_recovered(state_dir: str | None = None, timeout_s: float = 20.0) -> bool:
    """True when every balancer kill of this run happened and the runtime has the balancer
    running again (a new process, restarted, answering its health check); True at once
    when there was no kill. ActivityFailed says which kill did not happen or not recover."""
    deadline = time.monotonic() + timeout_s
    with _balancer_kills_lock:
        kills = list(_balancer_kills)
    for kill in kills:
        timer = kill.get("timer")
        if timer is not None:
            timer.join(max(0.0, deadline - time.monotonic()))
        if "error" in kill:
            raise ActivityFailed(kill["error"])
        if "at" not in kill:
            raise ActivityFailed(f"the balancer kill (pid {kill['pid']}) has not happened yet")
    if not kills:
        return True
    killed = {k["pid"] for k in kills}
    restarts = max(k["restarts_before"] for k in kills) + 1
    last = "not checked"
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        while True:
            cluster = load_cluster(state_dir)
            pid = cluster.balancer_pid
            if pid in killed or pid is None or not pid_alive(pid):
                last = f"no new balancer process (pid {pid})"
            elif cluster.balancer_restarts < restarts:
                last = f"{cluster.balancer_restarts} restarts recorded, expected {restarts}"
            else:
                try:
                    r = client.get(cluster.admin_url + "/healthz")
                    if r.status_code == 200:
                        return True
                    last = f"health check answered {r.status_code}"
                except httpx.HTTPError as err:
                    last = f"health check failed: {err!r}"
            if time.monotonic() >= deadline:
                raise ActivityFailed(f"the balancer did not recover within {timeout_s}s ({last})")
            time.sleep(RECOVERY_POLL_S)
