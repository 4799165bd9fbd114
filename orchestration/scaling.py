"""Backend replicas at run time on the embedded runtime: add, remove, replace on failure.

- `ReplicaSet` does the cluster's replica operations: a new replica is a `twlb backend`
  process with a fresh id (the next unused node index, so its own seed, and its port
  base + 2 + index unless that port is taken), registered with the balancer through its
  admin API once it answers; a removed one is deregistered first, then stopped by its
  pid. In the `replace` failure mode it also sends the heartbeats: a `/healthz` probe of
  every node each interval, all at once, counted by the balancer's own sans-IO
  `HealthTracker`; a node failing `failure_threshold` in a row is removed and a fresh
  replica with a new id takes its place, on a thread of its own; a replacement that does
  not start is tried again on another port after a doubling back-off. Every add, remove,
  failure and replacement (and failed attempt) is an event in `twlb status` and on the
  dashboard. None of this holds the cluster's lock while it waits: scaling and failure
  detection never wait on each other. The `restart` mode is the runtime's kubelet-like
  restart in place.
- `serve_control` runs the token-protected HTTP endpoints behind them inside `twlb up`
  (`GET|POST|DELETE /replicas`), on a port recorded in `.twlb/state.json`.
- `twlb replicas add N | rm N | ls` call those endpoints and print JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import click
import httpx
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from twlb.balancer.health import HealthTracker
from twlb.orchestration.prometheus import LocalPrometheus
from twlb.orchestration.supervision import RESTART_BASE_S, RESTART_CAP_S, NodeProcess
from twlb.processes.managed import ManagedProcess, free_port, port_in_use
from twlb.processes.state import ClusterError, read_state_file, state_dir_option

from twlb.options import FiniteFloat
from twlb.spec import FaultSpec, NodeAssignment, TrustCluster, describe_validation_error

log = logging.getLogger("twlb.orchestration.scaling")

#: The most replicas one call may add or remove, and the most a cluster may hold.
MAX_STEP = 50
MAX_REPLICAS = 100
MAX_BODY_BYTES = 4096


class FailureMode(StrEnum):
    RESTART = "restart"  # a dead node is restarted in place, with back-off (as a kubelet)
    REPLACE = "replace"  # a node failing its heartbeats is removed and replaced by a new one


@dataclass(frozen=True)
class HeartbeatSettings:
    """Heartbeats of the replace mode: a probe every `interval_s`, each given `timeout_s`;
    `failure_threshold` failures in a row and the node is replaced. The baseline design
    (docs/hashing.md) checked every 10 s with a 5 s timeout (10-15 s to notice a dead
    replica)."""

    interval_s: float = 1.0
    timeout_s: float = 0.5
    failure_threshold: int = 3

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.timeout_s > 0 and self.failure_threshold >= 1):
            raise ValueError("heartbeats need interval > 0, timeout > 0 and threshold >= 1")


def failure_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--on-failure`, `--heartbeat-interval`, `--heartbeat-timeout`, `--failure-threshold`,
    handed to the command as `failure_mode` and `heartbeat`."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        on_failure: str,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        failure_threshold: int,
        **kwargs: Any,
    ) -> Any:
        beat = HeartbeatSettings(heartbeat_interval, heartbeat_timeout, failure_threshold)
        return fn(*args, failure_mode=FailureMode(on_failure), heartbeat=beat, **kwargs)

    options = [
        click.option(
            "--on-failure",
            type=click.Choice([m.value for m in FailureMode]),
            default=FailureMode.RESTART.value,
            help="restart: restart a dead node in place; replace: replace a node that "
            "fails its heartbeats by a fresh replica with a new id.",
        ),
        click.option(
            "--heartbeat-interval",
            type=FiniteFloat(min=0.05, max=600),
            default=HeartbeatSettings.interval_s,
            help="replace mode: seconds between heartbeats.",
        ),
        click.option(
            "--heartbeat-timeout",
            type=FiniteFloat(min=0.01, max=600),
            default=HeartbeatSettings.timeout_s,
            help="replace mode: seconds a heartbeat waits for an answer.",
        ),
        click.option(
            "--failure-threshold",
            type=click.IntRange(1, 100),
            default=HeartbeatSettings.failure_threshold,
            help="replace mode: failed heartbeats in a row before a node is replaced.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


class ScaledCluster(Protocol):
    """What the replica set needs of the cluster it scales: the embedded runtime's
    `ScaledCluster` (orchestration/runtime.py), which holds a `ReplicaSet` of itself."""

    cluster: TrustCluster
    name: str
    port_base: int
    nodes: list[NodeProcess]
    heartbeat: HeartbeatSettings
    replacements: list[dict[str, Any]]
    balancer: ManagedProcess | None
    balancer_url: str
    admin_urls: list[str]
    admin_token: str
    runtime_token: str
    control_url: str | None
    prometheus_server: LocalPrometheus | None
    lock: threading.RLock

    @property
    def replicas(self) -> ReplicaSet: ...

    def start_node(self, node: NodeProcess) -> None: ...

    def write_state(self, stopped: bool = False) -> None: ...

    def write_truth(self) -> None: ...

    def start_rollout(self) -> dict[str, Any]: ...

    rollout: dict[str, Any] | None


class ScaleError(Exception):
    """A scaling request that cannot be done; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def node_row(node: NodeProcess) -> dict[str, Any]:
    return {
        "name": node.name,
        "index": node.assignment.index,
        "url": node.url,
        "pid": node.proc.pid if node.proc and node.proc.popen else None,
        "alive": node.alive,
    }


#: Scaling and replacement events kept for `twlb status` and the dashboard.
MAX_EVENTS = 100


@dataclass
class Replacement:
    """A node being replaced: what failed, and each attempt to start its replacement."""

    failed: NodeProcess
    failures: int
    first_failure: float
    detected: float
    name: str = ""  # the replacement's name, once an id is taken
    attempts: list[dict[str, Any]] = field(default_factory=list)
    next_attempt: float | None = None  # wall-clock time of the next try after a failure

    def row(self) -> dict[str, Any]:
        return {
            "failed": self.failed.name,
            "failed_url": self.failed.url,
            "replacement": self.name,
            "attempts": list(self.attempts),
            "next_attempt_at": self.next_attempt,
        }


class ReplicaSet:
    """The replica operations of one cluster, safe to call from several threads at once.

    The cluster's lock guards only its lists (nodes, replacements, events) and is held for
    moments: starting a process, waiting for it to answer, probing heartbeats and calling
    the balancer's admin API all happen outside it. So a `replicas add` that spends seconds
    starting processes never delays a heartbeat round, and a failed node is replaced (on
    a thread of its own) while other replicas are being added or removed.
    """

    def __init__(self, cluster: ScaledCluster) -> None:
        self.cluster = cluster
        beat = cluster.heartbeat
        # The balancer's health core counts the heartbeats (one definition of a run of
        # failed checks); a node is replaced on `failure_threshold` failures in a row.
        # Only the supervisor's heartbeat round touches it.
        self.health = HealthTracker(healthy_threshold=1, unhealthy_threshold=beat.failure_threshold)
        self._next_probe = 0.0
        self._first_failure: dict[str, float] = {}
        self._used = {n.assignment.index for n in cluster.nodes}
        self._starting: list[NodeProcess] = []  # started, not answering yet (under the lock)
        self._leaving: set[str] = set()  # names being removed or replaced (under the lock)
        self.replacing: dict[str, Replacement] = {}  # by failed node's name (under the lock)
        self.events: list[dict[str, Any]] = []  # add, remove, replace (under the lock)
        self._event_seq = 0
        self._stopping = threading.Event()
        self._workers: set[threading.Thread] = set()
        self._probes: ThreadPoolExecutor | None = None

    # ---- listing, adding, removing ------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        with self.cluster.lock:
            return [node_row(n) for n in self.cluster.nodes]

    def _event(self, kind: str, node: str, text: str, **extra: Any) -> None:
        """Record a scaling event (caller holds the lock)."""
        self._event_seq += 1
        self.events.append(
            {"seq": self._event_seq, "t": time.time(), "kind": kind, "node": node, "text": text}
            | extra
        )
        del self.events[:-MAX_EVENTS]

    def _port(self, index: int, taken: Collection[int] = ()) -> int:
        """The port of a new node: port base + 2 + its index as usual; a free one when that
        is taken (by anything on the machine, or by an attempt that failed)."""
        port = self.cluster.port_base + 2 + index
        if port <= 65535 and port not in taken and not port_in_use(port):
            return port
        other = free_port()
        log.warning(
            "port %d for replica index %d is in use; taking free port %d", port, index, other
        )
        return other

    def _new_node(self, index: int | None = None, taken: Collection[int] = ()) -> NodeProcess:
        """A node record with a fresh index (or `index`) and a port for it (lock held)."""
        c = self.cluster
        if index is None:
            index = max(self._used | {n.assignment.index for n in c.nodes}, default=-1) + 1
            self._used.add(index)
        assignment = NodeAssignment(
            index=index,
            name=f"{c.name}-node-{index}",
            seed=c.cluster.spec.seed * 1000 + index,
            fault=FaultSpec(),
        )
        return NodeProcess(assignment, self._port(index, taken), assignment.fault)

    def _start(self, nodes: list[NodeProcess], ready_timeout: float) -> None:
        """Start `nodes` and wait until each answers, outside the lock; on any failure every
        one of them is stopped again and the error raised."""
        c = self.cluster
        try:
            for node in nodes:
                with c.lock:
                    if self._stopping.is_set():
                        raise ScaleError("the cluster is stopping", 503)
                    c.start_node(node)
                    self._starting.append(node)
            for node in nodes:
                self._wait_ready(node, ready_timeout)
        except BaseException:
            for node in nodes:  # nothing half-started is left behind
                if node.proc is not None:
                    node.proc.stop()
            raise
        finally:
            with c.lock:
                self._starting = [n for n in self._starting if n not in nodes]

    def _wait_ready(self, node: NodeProcess, timeout: float) -> None:
        assert node.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._stopping.is_set():
                raise ScaleError("the cluster is stopping", 503)
            left = deadline - time.monotonic()
            try:
                node.proc.wait_ready(node.url + "/healthz", timeout=max(0.05, min(1.0, left)))
                return
            except TimeoutError:
                if left <= 1.0:
                    raise

    def add(self, count: int, ready_timeout: float = 30.0) -> list[dict[str, Any]]:
        """Spawn `count` replicas with fresh ids and register them with the balancer."""
        if not 1 <= count <= MAX_STEP:
            raise ScaleError(f"count must be in 1..{MAX_STEP}, got {count}", 422)
        c = self.cluster
        with c.lock:
            have = len(c.nodes) + len(self._starting)
            if have + count > MAX_REPLICAS:
                raise ScaleError(f"{have} + {count} replicas is more than {MAX_REPLICAS}")
            fresh = []
            for _ in range(count):
                fresh.append(self._new_node(taken={n.port for n in fresh}))
        self._start(fresh, ready_timeout)
        with c.lock:
            if self._stopping.is_set():
                for node in fresh:
                    node.proc.stop()  # type: ignore[union-attr]
                raise ScaleError("the cluster is stopping", 503)
            c.nodes.extend(fresh)
            for node in fresh:
                self._event("add", node.name, f"{node.name} added at {node.url}")
            self._cluster_changed()
        for node in fresh:
            self._register(node.url)
            log.info("replica %s added at %s (pid %s)", node.name, node.url, node.proc.pid)  # type: ignore[union-attr]
        return [node_row(n) for n in fresh]

    def remove(self, count: int | None = None, names: list[str] | None = None) -> list[dict]:
        """Deregister and stop `count` replicas (the newest first) or the ones named."""
        c = self.cluster
        with c.lock:
            staying = [n for n in c.nodes if n.name not in self._leaving]
            if names:
                unknown = sorted(set(names) - {n.name for n in staying})
                if unknown:
                    raise ScaleError(f"no replica named {', '.join(unknown)}", 404)
                chosen = [n for n in staying if n.name in names]
            else:
                if count is None or not 1 <= count <= MAX_STEP:
                    raise ScaleError(f"count must be in 1..{MAX_STEP}, got {count}", 422)
                chosen = sorted(staying, key=lambda n: n.assignment.index)[-count:]
            if len(chosen) >= len(staying):
                raise ScaleError(
                    f"cannot remove {len(chosen)} of {len(staying)} replicas: at least one "
                    "must remain"
                )
            self._leaving.update(n.name for n in chosen)
        rows = []
        try:
            for node in chosen:
                self._retire(node)
                rows.append(node_row(node))
                log.info("replica %s removed (pid %s stopped)", node.name, rows[-1]["pid"])
                with c.lock:
                    self._event("remove", node.name, f"{node.name} removed ({node.url})")
        finally:
            with c.lock:
                self._leaving.difference_update(n.name for n in chosen)
                self._cluster_changed()
        return rows

    def _retire(self, node: NodeProcess) -> None:
        """Out of the balancer first, then out of the cluster, then stopped by its pid."""
        self._deregister(node.url)
        with self.cluster.lock:
            if node in self.cluster.nodes:
                self.cluster.nodes.remove(node)
            self._first_failure.pop(node.name, None)
        if node.proc is not None:
            node.proc.stop()

    # ---- heartbeats and replacement -----------------------------------------------------
    def heartbeat_round(self, now: float) -> list[str]:
        """Probe every node once per interval, all at once and outside the lock; a node past
        the failure threshold is handed to a replacement thread. Returns events."""
        c = self.cluster
        beat = c.heartbeat
        if now < self._next_probe or self._stopping.is_set():
            return []
        self._next_probe = now + beat.interval_s
        with c.lock:
            nodes = [n for n in c.nodes if n.name not in self._leaving]
        self.health.set_backends([n.name for n in nodes], now)
        if self._probes is None:
            self._probes = ThreadPoolExecutor(16, thread_name_prefix="twlb-heartbeat")
        with httpx.Client(timeout=beat.timeout_s) as client:
            answers = list(
                self._probes.map(lambda n: n.alive and _answers(client, n.url + "/healthz"), nodes)
            )
        events = []
        for node, ok in zip(nodes, answers, strict=True):
            self.health.on_check(node.name, ok, now)
            if ok:
                self._first_failure.pop(node.name, None)
                continue
            self._first_failure.setdefault(node.name, time.time())
            failures = self.health.describe(node.name)["consecutive_failures"]
            if failures >= beat.failure_threshold:  # type: ignore[operator]
                event = self._begin_replacement(node, failures)  # type: ignore[arg-type]
                if event:
                    events.append(event)
        return events

    def _begin_replacement(self, node: NodeProcess, failures: int) -> str | None:
        c = self.cluster
        with c.lock:
            if node not in c.nodes or node.name in self._leaving or self._stopping.is_set():
                return None
            job = self._replacement(node, failures)
            worker = threading.Thread(
                target=self._replace, args=(job,), name=f"twlb-replace-{node.name}", daemon=True
            )
            self._workers.add(worker)
        worker.start()
        return f"{node.name} failed {failures} heartbeats: replacing it"

    def _replacement(self, node: NodeProcess, failures: int) -> Replacement:
        """Mark `node` as being replaced and log it (lock held)."""
        self._leaving.add(node.name)
        job = Replacement(
            node, failures, self._first_failure.get(node.name, time.time()), time.time()
        )
        self.replacing[node.name] = job
        self._event("fail", node.name, f"{node.name} failed {failures} heartbeats: replacing it")
        return job

    def replace(self, node: NodeProcess, failures: int, ready_timeout: float = 30.0) -> str:
        """Remove a node that failed its heartbeats and put a fresh replica in its place,
        now, on this thread (the heartbeat round hands this to a thread of its own)."""
        with self.cluster.lock:
            job = self._replacement(node, failures)
        return self._replace(job, ready_timeout) or ""

    def _replace(self, job: Replacement, ready_timeout: float = 30.0) -> str | None:
        """Retire the failed node, then start a replacement until one answers: a replacement
        that fails to start (its port taken, a crash at start) is tried again on another
        port after a back-off that doubles up to RESTART_CAP_S, each failure logged and
        shown in the state; the rest of the cluster keeps serving meanwhile."""
        c = self.cluster
        node = job.failed
        try:
            try:
                self._retire(node)
            except ScaleError as err:  # the balancer keeps it; health checks take it out
                log.warning("replacing %s: %s", node.name, err)
                with c.lock:
                    if node in c.nodes:
                        c.nodes.remove(node)
                if node.proc is not None:
                    node.proc.stop()
            with c.lock:
                self._leaving.discard(node.name)
                self._cluster_changed()
            delay = RESTART_BASE_S
            fresh: NodeProcess | None = None
            while not self._stopping.is_set():
                with c.lock:
                    index = fresh.assignment.index if fresh is not None else None
                    taken = {int(a["port"]) for a in job.attempts}
                    fresh = self._new_node(index, taken)
                    job.name = fresh.name
                try:
                    self._start([fresh], ready_timeout)
                except Exception as err:
                    if self._stopping.is_set():
                        return None
                    why = _why_not_started(fresh, err)
                    with c.lock:
                        job.attempts.append({"port": fresh.port, "at": time.time(), "error": why})
                        job.next_attempt = time.time() + delay
                        text = (
                            f"replacement {fresh.name} of {node.name} did not start on port "
                            f"{fresh.port} ({why}); trying another port in {delay:.1f}s"
                        )
                        self._event("replace-failed", fresh.name, text, failed=node.name)
                        c.write_state()
                    log.warning(text)
                    if self._stopping.wait(delay):
                        return None
                    delay = min(delay * 2, RESTART_CAP_S)
                    continue
                return self._replaced(job, fresh)
            return None
        finally:
            with c.lock:
                self.replacing.pop(node.name, None)
                self._leaving.discard(node.name)
                self._workers.discard(threading.current_thread())

    def _replaced(self, job: Replacement, fresh: NodeProcess) -> str | None:
        c = self.cluster
        node = job.failed
        with c.lock:
            if self._stopping.is_set():
                if fresh.proc is not None:
                    fresh.proc.stop()
                return None
            c.nodes.append(fresh)
        self._register(fresh.url)
        serving = time.time()
        entry = {
            "failed": node.name,
            "failed_url": node.url,
            "replacement": fresh.name,
            "replacement_url": fresh.url,
            "replacement_pid": fresh.proc.pid if fresh.proc else None,
            "failed_heartbeats": job.failures,
            "first_failed_heartbeat_at": job.first_failure,
            "detected_at": job.detected,
            "serving_at": serving,
            "detection_s": round(job.detected - job.first_failure, 3),
            "replacement_s": round(serving - job.detected, 3),
            "failed_attempts": list(job.attempts),
        }
        with c.lock:
            c.replacements.append(entry)
            message = (
                f"{node.name} failed {job.failures} heartbeats: replaced by {fresh.name} at "
                f"{fresh.url} ({entry['replacement_s']:.2f}s after detection; replacement "
                f"#{len(c.replacements)}"
                + (f", after {len(job.attempts)} failed starts" if job.attempts else "")
                + ")"
            )
            self._event("replace", fresh.name, message, failed=node.name)
            self._cluster_changed()
        log.warning(message)
        return message

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop replacing and adding: processes still starting are stopped by their pids,
        replacement threads end."""
        self._stopping.set()
        with self.cluster.lock:
            starting = list(self._starting)
            workers = list(self._workers)
        for node in starting:
            if node.proc is not None:
                node.proc.stop()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if self._probes is not None:
            self._probes.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        """Replacements under way and recent events, for the state file (lock held)."""
        return {
            "replacing": [job.row() for job in self.replacing.values()],
            "events": list(self.events),
        }

    # ---- the balancer's admin API, Prometheus and the state files ----------------------
    def _admin(self, method: str, **kwargs: Any) -> list[httpx.Response]:
        """The same admin call to every balancer replica that runs (one restarting starts
        with the cluster's current node list)."""
        c = self.cluster
        answers = []
        for replica in getattr(c, "balancers", ()):
            if not replica.alive():
                continue
            try:
                answers.append(
                    httpx.request(
                        method,
                        replica.admin_url + "/admin/backends",
                        headers={"Authorization": f"Bearer {c.admin_token}"},
                        timeout=5.0,
                        **kwargs,
                    )
                )
            except httpx.HTTPError as err:
                raise ScaleError(
                    f"balancer {replica.name} did not answer its admin API: {err}", 502
                ) from None
        return answers

    def _register(self, url: str) -> None:
        for r in self._admin("POST", json={"url": url}):
            if r.status_code not in (201, 409):
                raise ScaleError(f"the balancer refused {url}: {r.status_code} {r.text}", 502)

    def _deregister(self, url: str) -> None:
        for r in self._admin("DELETE", params={"url": url}):
            if r.status_code not in (200, 404):
                raise ScaleError(f"the balancer kept {url}: {r.status_code} {r.text}", 502)

    def _cluster_changed(self) -> None:
        """Truth, state and Prometheus's targets follow the node list (lock held)."""
        c = self.cluster
        c.write_truth()
        c.write_state()
        if c.prometheus_server is not None:
            c.prometheus_server.set_nodes([n.url for n in c.nodes])


def _why_not_started(node: NodeProcess, err: Exception) -> str:
    """One line on why a node did not start: its exit status and the last error it logged
    (a taken port: "... address already in use"), else its last line; or the error."""
    proc = node.proc
    if proc is not None and proc.returncode() is not None:
        last = ""
        if proc.log_path is not None:
            with contextlib.suppress(OSError):
                lines = proc.log_path.read_text(errors="replace").strip().splitlines()[-50:]
                errors = [line for line in lines if "error" in line.lower()]
                last = (errors or lines or [""])[-1].strip()
        return f"exited with status {proc.returncode()}" + (f": {last[:200]}" if last else "")
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the control endpoints inside `twlb up` ----------------------------------------------


class ScaleRequest(BaseModel):
    """Body of POST and DELETE /replicas (`n` is the baseline design's name for count)."""

    model_config = ConfigDict(extra="forbid")
    count: int | None = Field(None, ge=1, le=MAX_STEP, validation_alias=AliasChoices("count", "n"))
    names: list[str] | None = Field(None, max_length=MAX_STEP)


class _ControlHandler(BaseHTTPRequestHandler):
    server: ControlServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("control: " + format, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            self._send(401, {"error": "the replicas API needs Authorization: Bearer <token>"})
            return False
        if not secrets.compare_digest(token.encode(), self.server.token.encode()):
            self._send(401, {"error": "wrong token"})
            return False
        return True

    def _request(self) -> ScaleRequest | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return None
        raw = self.rfile.read(length) if length else b""
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        try:
            doc = json.loads(raw) if raw.strip() else {}
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
            if "count" in query:
                doc.setdefault("count", query["count"])
            return ScaleRequest.model_validate(doc)
        except ValidationError as err:
            self._send(422, {"error": describe_validation_error(err)})
        except ValueError as err:
            self._send(400, {"error": f"not a JSON object: {err}"})
        return None

    def _route(self) -> bool:
        if urlsplit(self.path).path != "/replicas":
            self._send(404, {"error": f"no endpoint {urlsplit(self.path).path}; try /replicas"})
            return False
        return self._authorized()

    def _rollout(self) -> bool:
        """GET and POST /rollout: the balancer replicas' rolling restart (`twlb rollout`)."""
        if urlsplit(self.path).path != "/rollout":
            return False
        if self._authorized():
            cluster = self.server.cluster
            if self.command == "POST":
                self._send(202, {"rollout": cluster.start_rollout()})
            else:
                self._send(200, {"rollout": cluster.rollout})
        return True

    def _answer(self, status: int, key: str, action: Callable[[], list[dict]]) -> None:
        replicas = self.server.cluster.replicas
        try:
            done = action()
        except ScaleError as err:
            self._send(err.status, {"error": str(err)})
            return
        except Exception as err:  # a replica that did not start: say so, keep serving
            log.exception("replicas: %s failed", key)
            self._send(500, {"error": f"{key} failed: {err}"})
            return
        self._send(status, {key: done, "replicas": replicas.rows()})

    def do_GET(self) -> None:
        if self._rollout():
            return
        if self._route():
            self._send(200, {"replicas": self.server.cluster.replicas.rows()})

    def do_POST(self) -> None:
        if self._rollout():
            return
        if self._route() and (req := self._request()) is not None:
            if req.count is None:
                self._send(422, {"error": "count: say how many replicas to add"})
                return
            count = req.count
            self._answer(201, "added", lambda: self.server.cluster.replicas.add(count))

    def do_DELETE(self) -> None:
        if self._route() and (req := self._request()) is not None:
            if req.count is None and not req.names:
                self._send(422, {"error": "count or names: say which replicas to remove"})
                return
            replicas = self.server.cluster.replicas
            self._answer(200, "removed", lambda: replicas.remove(req.count, req.names))


class ControlServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cluster: ScaledCluster, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _ControlHandler)
        self.cluster = cluster
        self.token = cluster.runtime_token
        self.thread = threading.Thread(target=self.serve_forever, name="twlb-control", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


def serve_control(cluster: ScaledCluster, port: int = 0) -> ControlServer:
    """Start the replicas endpoints for `cluster` on loopback (port 0: any free one) and
    record their URL in the state file; ClusterError (exit status 2) when the port is
    taken."""
    try:
        server = ControlServer(cluster, port)
    except OSError as err:
        raise ClusterError(
            f"cannot serve the replicas API on port {port}: {err.strerror or err}; "
            "pick another --control-port (0: any free port)"
        ) from None
    server.thread.start()
    cluster.control_url = server.url
    with cluster.lock:
        cluster.write_state()
    return server


# ---- `twlb replicas` --------------------------------------------------------------------


class ReplicasError(click.ClickException):
    exit_code = 2


def _call(state_dir: str, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    state = read_state_file(Path(state_dir))
    url = (state.get("control") or {}).get("url")
    if state.get("stopped") or not url:
        raise ReplicasError(f"the cluster in {state_dir} is not running (start it with twlb up)")
    token = (state.get("tokens") or {}).get("runtime", "")
    try:
        r = httpx.request(
            method,
            url + "/replicas",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=120.0,  # new replicas are processes that take seconds to answer
        )
    except httpx.HTTPError as err:
        raise ReplicasError(f"no answer from {url}: {err}; is `twlb up` running?") from None
    with contextlib.suppress(ValueError):
        answer = r.json()
        if r.status_code < 400:
            return answer
        message = answer.get("error", r.text) if isinstance(answer, dict) else r.text
        if r.status_code >= 500:
            raise click.ClickException(message)
        raise ReplicasError(message)
    raise click.ClickException(f"{url} answered {r.status_code}: {r.text[:200]}")


_state_dir = state_dir_option()


@click.group("replicas")
def command() -> None:
    """Add, remove and list the running cluster's backend replicas (JSON)."""


@command.command("ls")
@_state_dir
def ls_command(state_dir: str) -> None:
    """List the replicas: name, index, url, pid, alive."""
    click.echo(json.dumps(_call(state_dir, "GET"), indent=2))


@command.command("add")
@click.argument("count", type=click.IntRange(1, MAX_STEP))
@_state_dir
def add_command(count: int, state_dir: str) -> None:
    """Spawn COUNT replicas with fresh ids and register them with the balancer."""
    click.echo(json.dumps(_call(state_dir, "POST", {"count": count}), indent=2))


@command.command("rm")
@click.argument("count", type=click.IntRange(1, MAX_STEP))
@_state_dir
def rm_command(count: int, state_dir: str) -> None:
    """Deregister COUNT replicas (the newest first), then stop them by pid."""
    click.echo(json.dumps(_call(state_dir, "DELETE", {"count": count}), indent=2))
