"""The embedded runtime's state directory: its layout, and reading what `twlb up` wrote.

`twlb up` (orchestration/runtime.py) writes it; `twlb status`, `twlb replicas`, the chaos
experiments (twlb.chaos) and the dashboard read it. Keeping the layout here, below all
of them, is what lets the readers sit below the runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import click
import httpx
from twlb.processes.managed import pid_alive

#: Where `twlb up` keeps its state unless told otherwise (.gitignore leaves it out).
DEFAULT_STATE_DIR = ".twlb"
STATE_FILE = "state.json"
TRUTH_FILE = "truth.json"
#: What chaos actions did to the cluster, one JSON object a line (twlb.chaos writes it,
#: the dashboard shows it).
CHAOS_FILE = "chaos.jsonl"


def state_dir_option(help: str = "The state directory of a running `twlb up`.") -> Any:
    """The --state-dir option of every command that writes or reads `twlb up`'s state."""
    return click.option(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        show_default=True,
        type=click.Path(file_okay=False),
        help=help,
    )


class ClusterError(click.ClickException):
    """A problem with the cluster file, its ports or its state, reported with exit status 2."""

    exit_code = 2


def atomic_write(path: Path, data: Any, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def read_state_file(state_dir: Path) -> dict[str, Any]:
    """The state file `twlb up` keeps, as written; ClusterError says why there is none."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(
            f"no cluster: {path} does not exist (start one with `twlb up --state-dir {state_dir}`)"
        ) from None
    except OSError as err:
        raise ClusterError(f"cannot read cluster state {path}: {err.strerror or err}") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise ClusterError(f"cannot read cluster state {path}: not JSON: {err}") from None
    if not isinstance(state, dict):
        raise ClusterError(f"cluster state {path} is not a JSON object")
    return state


def read_status(state_dir: Path, timeout: float = 1.0) -> dict[str, Any]:
    """The state file enriched with live checks: processes, live faults and trust."""
    state = read_state_file(state_dir)
    try:
        return _with_live_checks(state, timeout)
    except (KeyError, TypeError, ValueError) as err:
        path = state_dir / STATE_FILE
        raise ClusterError(f"cluster state {path} is not one `twlb up` wrote: {err!r}") from None


def _with_live_checks(state: dict[str, Any], timeout: float) -> dict[str, Any]:
    tokens = state.pop("tokens", {})
    state["running"] = not state.get("stopped") and pid_alive(int(state.get("runtime_pid", 0)))
    if not state["running"]:
        return state
    headers = {"Authorization": f"Bearer {tokens.get('control', '')}"}
    with httpx.Client(timeout=timeout) as client:
        bal = state["balancer"]
        bal["alive"] = bool(bal.get("pid")) and pid_alive(int(bal["pid"]))
        for node in state["nodes"]:
            node["alive"] = bool(node.get("pid")) and pid_alive(int(node["pid"]))
            with contextlib.suppress(httpx.HTTPError, httpx.InvalidURL, ValueError):
                r = client.get(node["url"] + "/control/fault", headers=headers)
                if r.status_code == 200:
                    live = r.json()
                    node["fault"] = live.get("fault", live)
        with contextlib.suppress(httpx.HTTPError, httpx.InvalidURL, ValueError):
            # The admin listener (the traffic port proxies /trust to the backends).
            admin = bal.get("admin_url") or bal["url"]
            state["trust"] = client.get(admin + "/trust").json()
    return state
