"""Process supervision of a local cluster: each backend node's process record and the
kubelet-like restart back-off the runtime's supervisor applies to nodes and the balancer."""

from __future__ import annotations

from dataclasses import dataclass, field

from twlb.processes.managed import ManagedProcess

from twlb.spec import FaultSpec, NodeAssignment, NodeClass

#: Restart back-off as a kubelet does it, scaled for a laptop: doubling, capped, reset
#: after a node has run cleanly for RESTART_RESET_S.
RESTART_BASE_S = 0.5
RESTART_CAP_S = 8.0
RESTART_RESET_S = 10.0


@dataclass
class RestartBackoff:
    """Kubelet-like restarts of one process (sans-IO): a death schedules a start after the
    current back-off, which doubles up to RESTART_CAP_S and resets once the process has run
    cleanly for RESTART_RESET_S."""

    restarts: int = 0
    next_start: float = 0.0  # 0.0: no start scheduled
    started_at: float = 0.0
    backoff_s: float = RESTART_BASE_S

    def started(self, now: float) -> None:
        self.started_at = now
        self.next_start = 0.0

    def observe(self, alive: bool, now: float) -> str | None:
        """'exited' when a death is first seen (a start is now scheduled at `next_start`),
        'due' when that start's time has come (the caller starts the process), else None."""
        if alive:
            if now - self.started_at > RESTART_RESET_S:
                self.backoff_s = RESTART_BASE_S  # it ran cleanly long enough
            return None
        if not self.next_start:
            self.next_start = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, RESTART_CAP_S)
            return "exited"
        if now < self.next_start:
            return None
        self.next_start = 0.0
        self.restarts += 1
        return "due"

    def start_failed(self, now: float) -> float:
        """The start that was due did not happen (the process could not be started): the
        next one is scheduled after the current back-off, which doubles (the restart it
        counted did not happen). Returns the wait."""
        self.restarts -= 1
        self.next_start = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, RESTART_CAP_S)
        return self.next_start - now


@dataclass
class NodeProcess:
    """One backend node: its assignment, port, live fault and process."""

    assignment: NodeAssignment
    port: int
    fault: FaultSpec
    proc: ManagedProcess | None = None
    restart: RestartBackoff = field(default_factory=RestartBackoff)

    @property
    def name(self) -> str:
        return self.assignment.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    @property
    def truth(self) -> NodeClass:
        """Ground truth now: a node that is down is a crash, else its fault's class."""
        if not self.alive:
            return NodeClass.CRASH
        return self.fault.node_class
