"""The embedded cluster as a chaos experiment sees it: the state directory of `twlb up`.

`twlb up --state-dir DIR` keeps DIR/state.json (mode 0600: it holds the control and admin
tokens) with the balancer's URL and every node's name, URL and pid. Experiments name
only the state directory; this module reads it and fails at once, with a message that
says what is missing, when there is no cluster there or it is not running, so that an
experiment pointed at nothing stops in its first probe instead of hanging.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaoslib.exceptions import ActivityFailed
from twlb.processes.managed import pid_alive
from twlb.processes.state import CHAOS_FILE, STATE_FILE, ClusterError, read_state_file

from twlb.spec import FaultSpec

#: Environment variable experiments read their state directory from (configuration).
STATE_DIR_ENV = "TWLB_CHAOS_STATE_DIR"


@dataclass(frozen=True)
class NodeState:
    """One backend node as the runtime last wrote it."""

    name: str
    index: int
    url: str
    pid: int | None
    fault: FaultSpec


@dataclass(frozen=True)
class ClusterState:
    """What a chaos activity needs to reach the cluster: URLs, pids and tokens."""

    state_dir: Path
    name: str
    runtime_pid: int
    balancer_url: str
    admin_url: str  # the balancer's own endpoints (its first replica's admin listener)
    nodes: tuple[NodeState, ...]
    control_token: str
    #: The balancer's process as the runtime last wrote it (None while it is down).
    balancer_pid: int | None = None
    #: How often the runtime has restarted the balancer.
    balancer_restarts: int = 0

    def node(self, which: str | int) -> NodeState:
        """A node by name, index (also as a string) or URL."""
        for n in self.nodes:
            if str(which) in (n.name, str(n.index), n.url):
                return n
        names = ", ".join(n.name for n in self.nodes)
        raise ActivityFailed(f"no node {which!r} in cluster {self.name} (nodes: {names})")

    def control_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.control_token}"}

    def record(self, action: str, done: dict[str, Any]) -> dict[str, Any]:
        """Append what an action did to the state directory's chaos log (the dashboard's
        event log reads it); returns `done` unchanged."""
        line = json.dumps({"action": action, **done}, separators=(",", ":"), default=str)
        with open(self.state_dir / CHAOS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        return done


def resolve_state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    """The state directory an activity was given, else the one in the environment."""
    value = state_dir or os.environ.get(STATE_DIR_ENV)
    if not value:
        raise ActivityFailed(
            f"no state directory: set the experiment's configuration 'state_dir' "
            f"or {STATE_DIR_ENV} to the --state-dir of a running `twlb up`"
        )
    return Path(value)


def _raw(state_dir: Path) -> dict[str, Any]:
    try:
        return read_state_file(state_dir)
    except ClusterError as err:
        raise ActivityFailed(err.message) from None


def load_cluster(state_dir: str | os.PathLike[str] | None) -> ClusterState:
    """The running cluster of a state directory, or ActivityFailed saying why there is none."""
    d = resolve_state_dir(state_dir)
    doc = _raw(d)
    path = d / STATE_FILE
    try:
        runtime_pid = int(doc["runtime_pid"])
        if doc.get("stopped") or not pid_alive(runtime_pid):
            raise ActivityFailed(
                f"no cluster running: the runtime of {path} (pid {runtime_pid}) has stopped"
            )
        nodes = tuple(
            NodeState(
                name=str(n["name"]),
                index=int(n["index"]),
                url=str(n["url"]),
                pid=int(n["pid"]) if n.get("pid") else None,
                fault=FaultSpec.model_validate(n.get("fault") or {}),
            )
            for n in doc["nodes"]
        )
        return ClusterState(
            state_dir=d,
            name=str(doc["cluster"]),
            runtime_pid=runtime_pid,
            balancer_url=str(doc["balancer"]["url"]),
            admin_url=str(doc["balancer"].get("admin_url") or doc["balancer"]["url"]),
            nodes=nodes,
            control_token=str(doc["tokens"]["control"]),
            balancer_pid=int(doc["balancer"]["pid"]) if doc["balancer"].get("pid") else None,
            balancer_restarts=int(doc["balancer"].get("restarts") or 0),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ActivityFailed(f"cluster state {path} lacks or mangles {err}") from None
