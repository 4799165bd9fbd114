"""What the dashboard shows, as a sans-IO state machine: observations in, frames and events out.

The server polls the balancer (`/trust`, `/metrics`), the nodes (live fault, `/gossip`)
and the runtime's state file, and hands each round to `ClusterView.observe` as an
`Observation` with its `now`. The view keeps the last minutes of trust weights and
outcome rates, turns differences between rounds into events (an ejection, a
readmission, a hold, a fault switched, a process that exited, restarted or was
replaced, the balancer going down, a replica added, removed or replaced) and renders
JSON frames for the page. A backend that leaves the cluster leaves the page in the same
round. It does no I/O and reads no clock, so tests drive it with made-up rounds.

Nothing here ever holds a token: observations carry facts, not credentials.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twlb.spec import FAULT_CLASS, FaultType, NodeClass

#: How much history the page gets (seconds) and how many events it keeps.
HISTORY_S = 300.0
MAX_EVENTS = 300
#: Upper bound on the points kept per series, whatever the poll interval.
MAX_POINTS = 1200
#: Gossip answers are summarised; a peer that lists more members than this is cut.
MAX_GOSSIP_MEMBERS = 64

#: Balancer request outcomes that count as a failure of the request.
FAILED_OUTCOMES = frozenset({"error", "failed", "no_backend", "quorum_failed"})


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """One backend node as the runtime (or its control endpoint) knows it: the ground truth."""

    name: str
    url: str
    alive: bool | None = None  # None: not known (no runtime state to read)
    pid: int | None = None
    restarts: int | None = None
    fault: str | None = None  # the fault type it carries now; None: unknown


@dataclass(slots=True)
class Observation:
    """One polling round. `trust` is the balancer's `/trust` (None when it did not answer);
    `counters` are samples of its `/metrics` as {(name, labels): value}; `gossip` maps a
    node URL to its `/gossip` document, "off" for a 404 and None when it did not answer."""

    now: float
    trust: dict[str, Any] | None
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    nodes: list[NodeFacts] = field(default_factory=list)
    gossip: dict[str, Any] = field(default_factory=dict)
    balancer_pid: int | None = None
    chaos: list[dict[str, Any]] = field(default_factory=list)  # chaos actions since last round
    #: Every backend URL in the cluster now (the runtime's nodes, or the balancer's
    #: backends); None when this round could not tell (the balancer did not answer).
    members: frozenset[str] | None = None
    #: Scaling events the runtime logged since the last round (add, remove, fail,
    #: replace, replace-failed); None when the source keeps no such log (then joins and
    #: leaves are read from `members`).
    scaling: list[dict[str, Any]] | None = None


def truth_of(node: NodeFacts) -> str | None:
    """The class a node really is now: crash when its process is down, else its fault's."""
    if node.alive is False:
        return NodeClass.CRASH.value
    if node.fault is None:
        return None
    try:
        return FAULT_CLASS[FaultType(node.fault)].value
    except ValueError:
        return None


def verdict_of(row: dict[str, Any]) -> str | None:
    """The balancer's verdict on a `/trust` row: `byzantine` once audits have proven it a
    liar (proof outranks the model, which may still score its windows healthy), else the
    class the model finds most likely."""
    if row.get("proven") is True:
        return "byzantine"
    probs = row.get("probabilities")
    if not isinstance(probs, dict) or not probs:
        return None
    best = max(probs.items(), key=lambda kv: float(kv[1]) if _is_number(kv[1]) else -1.0)
    return str(best[0])


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _sum(counters: dict, name: str, **match: str) -> float | None:
    """Sum of every sample of `name` whose labels include `match`; None when there is none."""
    total, seen = 0.0, False
    for (n, labels), v in counters.items():
        if n != name:
            continue
        d = dict(labels)
        if all(d.get(k) == want for k, want in match.items()):
            total += v
            seen = True
    return total if seen else None


def _delta(now: float | None, before: float | None) -> float | None:
    """Counter increase between rounds; a counter that went down was reset (a restart)."""
    if now is None:
        return None
    if before is None:
        return None
    return now - before if now >= before else now


@dataclass(slots=True)
class _Backend:
    url: str
    name: str
    weights: deque = field(default_factory=lambda: deque(maxlen=MAX_POINTS))
    state: str | None = None
    held: bool = False
    fault: str | None = None
    alive: bool | None = None
    pid: int | None = None
    restarts: int | None = None
    row: dict[str, Any] = field(default_factory=dict)
    truth: str | None = None
    req_rate: float | None = None
    err_ratio: float | None = None
    wrong_caught: float | None = None  # audit mismatches the balancer counted, in all
    seen: float = 0.0  # the last round that named it


class ClusterView:
    """The dashboard's state: fed `Observation`s, it returns events and renders frames."""

    def __init__(self, history_s: float = HISTORY_S, max_events: int = MAX_EVENTS) -> None:
        self.history_s = history_s
        self.backends: dict[str, _Backend] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.outcomes: deque[tuple[float, dict[str, float]]] = deque(maxlen=MAX_POINTS)
        self.policy: str | None = None
        self.balancer_up: bool | None = None
        self.balancer_pid: int | None = None
        self.gossip: dict[str, Any] = {}
        self._last: Observation | None = None
        self.now = 0.0

    # ---- input --------------------------------------------------------------------------
    def observe(self, obs: Observation) -> list[dict[str, Any]]:
        """Take one round; return the events it revealed (also kept in `self.events`)."""
        self.now = obs.now
        new: list[dict[str, Any]] = []

        def event(kind: str, text: str, node: str | None = None, **extra: Any) -> None:
            e = {"t": obs.now, "kind": kind, "node": node, "text": text, **extra}
            new.append(e)
            self.events.append(e)

        names = {n.url: n.name for n in obs.nodes}
        # A balancer back from a restart has forgotten its verdicts: states it starts
        # over in are not readmissions.
        fresh = self.balancer_up is False or (
            obs.balancer_pid is not None
            and self.balancer_pid is not None
            and obs.balancer_pid != self.balancer_pid
        )
        self._balancer(obs, event)
        self._membership(obs, names, event)
        members = obs.members
        if obs.trust is not None:
            self.policy = obs.trust.get("policy")
            for row in obs.trust.get("backends", []):
                url = str(row.get("url"))
                if members is not None and url not in members:
                    continue  # on its way out: the cluster no longer has it
                b = self._backend(url, names.get(url))
                self._trust_row(b, row, obs, event, fresh)
        for facts in obs.nodes:
            self._node(self._backend(facts.url, facts.name), facts, event)
        for record in obs.chaos:
            event("chaos", chaos_text(record), _str(record.get("node")))
        self._rates(obs)
        self.gossip = {url: _gossip_summary(doc) for url, doc in obs.gossip.items()}
        self._trim(obs.now)
        self._last = obs
        return new

    def _membership(self, obs: Observation, names: dict[str, str], event: Any) -> None:
        """Backends that left the cluster leave the page now; joins and leaves are events
        (the runtime's own log says it better when there is one: add, remove, replace)."""
        if obs.members is not None:
            derive = obs.scaling is None and self._last is not None
            for url in [u for u in self.backends if u not in obs.members]:
                b = self.backends.pop(url)
                if derive:
                    event("remove", f"{b.name} left the cluster", b.name)
            if derive:
                for url in sorted(obs.members - set(self.backends)):
                    name = names.get(url) or _short(url)
                    event("add", f"{name} joined the cluster", name)
        for record in obs.scaling or ():
            kind = _str(record.get("kind")) or "scaling"
            event(kind[:32], _str(record.get("text")) or kind, _str(record.get("node")))

    def _backend(self, url: str, name: str | None) -> _Backend:
        b = self.backends.get(url)
        if b is None:
            b = self.backends[url] = _Backend(url=url, name=name or _short(url))
        elif name:
            b.name = name
        b.seen = self.now
        return b

    def _balancer(self, obs: Observation, event: Any) -> None:
        up = obs.trust is not None
        if self.balancer_up is not None and up != self.balancer_up:
            if up:
                event("balancer", "balancer answers again")
            else:
                event("balancer", "balancer does not answer")
        elif (
            obs.balancer_pid is not None
            and self.balancer_pid is not None
            and obs.balancer_pid != self.balancer_pid
        ):
            event("restart", f"balancer replaced (pid {self.balancer_pid} -> {obs.balancer_pid})")
        self.balancer_up = up
        if obs.balancer_pid is not None:
            self.balancer_pid = obs.balancer_pid

    def _trust_row(
        self, b: _Backend, row: dict[str, Any], obs: Observation, event: Any, fresh: bool
    ) -> None:
        weight = float(row.get("weight", 0.0))
        state = str(row.get("state"))
        held = bool(row.get("held"))
        b.weights.append((obs.now, weight))
        if fresh:
            if b.state is not None and state != b.state:
                event("reset", f"{b.name} starts over in {state}: the balancer restarted", b.name)
        elif b.state is not None and state != b.state:
            if state == "ejected":
                reason = self._ejection_reason(b.url, obs)
                why = f" ({reason})" if reason else ""
                event("eject", f"{b.name} ejected{why}, weight {weight:.2f}", b.name, reason=reason)
            elif b.state == "ejected":
                event("readmit", f"{b.name} readmitted ({state}), weight {weight:.2f}", b.name)
        if fresh:
            pass  # holds, too, start over with the balancer
        elif held and not b.held:
            event("hold", f"{b.name} held in rotation by the floor, weight {weight:.2f}", b.name)
        elif b.held and not held and state != "ejected":
            event("release", f"{b.name} no longer held, weight {weight:.2f}", b.name)
        b.state, b.held, b.row = state, held, row

    def _ejection_reason(self, url: str, obs: Observation) -> str | None:
        """The reason label whose ejection counter grew this round, when the balancer has one."""
        if self._last is None:
            return None
        for (name, labels), v in obs.counters.items():
            d = dict(labels)
            if name != "twlb_balancer_ejections_total" or d.get("backend") != url:
                continue
            before = self._last.counters.get((name, labels), 0.0)
            if v > before:
                return d.get("reason")
        return None

    def _node(self, b: _Backend, facts: NodeFacts, event: Any) -> None:
        if facts.fault is not None and b.fault is not None and facts.fault != b.fault:
            event("fault", f"{b.name} fault switched {b.fault} -> {facts.fault}", b.name)
        if b.alive is True and facts.alive is False:
            event("exit", f"{b.name} process exited", b.name)
        if facts.pid is not None and b.pid is not None and facts.pid != b.pid:
            count = f", restart #{facts.restarts}" if facts.restarts else ""
            event("restart", f"{b.name} replaced (pid {b.pid} -> {facts.pid}{count})", b.name)
        if facts.fault is not None:
            b.fault = facts.fault
        b.alive, b.restarts = facts.alive, facts.restarts
        if facts.pid is not None:
            b.pid = facts.pid
        b.truth = truth_of(NodeFacts(b.name, b.url, b.alive, b.pid, b.restarts, b.fault))

    def _rates(self, obs: Observation) -> None:
        last = self._last
        if last is None:
            return
        dt = obs.now - last.now
        if dt <= 0:
            return
        name = "twlb_balancer_requests_total"
        outcomes = {dict(labels).get("outcome", "") for (n, labels) in obs.counters if n == name}
        rates: dict[str, float] = {}
        for outcome in sorted(outcomes):
            d = _delta(
                _sum(obs.counters, name, outcome=outcome),
                _sum(last.counters, name, outcome=outcome),
            )
            if d is not None:
                rates[outcome] = d / dt
        if rates:
            self.outcomes.append((obs.now, rates))
        up = "twlb_balancer_upstream_requests_total"
        for b in self.backends.values():
            b.wrong_caught = _sum(
                obs.counters, "twlb_balancer_audit_mismatches_total", backend=b.url
            )
            total = _delta(
                _sum(obs.counters, up, backend=b.url), _sum(last.counters, up, backend=b.url)
            )
            ok = _delta(
                _sum(obs.counters, up, backend=b.url, outcome="success"),
                _sum(last.counters, up, backend=b.url, outcome="success"),
            )
            if total is None:
                continue
            b.req_rate = total / dt
            b.err_ratio = (1.0 - (ok or 0.0) / total) if total > 0 else None

    def _trim(self, now: float) -> None:
        cutoff = now - self.history_s
        # A backend no round names any more (membership unknown) leaves once its history
        # has aged out.
        for url in [u for u, b in self.backends.items() if b.seen < cutoff]:
            del self.backends[url]
        for b in self.backends.values():
            while b.weights and b.weights[0][0] < cutoff:
                b.weights.popleft()
        while self.outcomes and self.outcomes[0][0] < cutoff:
            self.outcomes.popleft()

    # ---- output -------------------------------------------------------------------------
    def _card(self, b: _Backend) -> dict[str, Any]:
        row = b.row
        return {
            "url": b.url,
            "name": b.name,
            "truth": b.truth,
            "fault": b.fault,
            "verdict": verdict_of(row) if row else None,
            "weight": b.weights[-1][1] if b.weights else None,
            "state": b.state,
            "held": b.held,
            "up": row.get("up"),
            "alive": b.alive,
            "pid": b.pid,
            "restarts": b.restarts,
            "req_rate": b.req_rate,
            "err_ratio": b.err_ratio,
            "wrong_caught": b.wrong_caught,
        }

    def _header(self) -> dict[str, Any]:
        return {
            "t": self.now,
            "policy": self.policy,
            "balancer_up": self.balancer_up,
            "history_s": self.history_s,
            "backends": [self._card(b) for b in self.backends.values()],
            "gossip": self.gossip,
        }

    def frame(self, new_events: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """The latest round: cards, the newest weight and rate points, and new events."""
        frame = self._header()
        frame["points"] = {b.url: b.weights[-1] for b in self.backends.values() if b.weights}
        frame["outcomes"] = self.outcomes[-1] if self.outcomes else None
        frame["events"] = list(new_events)
        return frame

    def snapshot(self) -> dict[str, Any]:
        """Everything a page that just connected needs: cards, history and the event log."""
        snap = self._header()
        snap["history"] = {b.url: list(b.weights) for b in self.backends.values()}
        snap["outcome_history"] = list(self.outcomes)
        snap["events"] = list(self.events)
        return snap


def _str(x: Any) -> str | None:
    return None if x is None else str(x)[:200]


def chaos_text(record: dict[str, Any]) -> str:
    """One chaos action as the event log says it (bounded, whatever the log holds)."""
    action = str(record.get("action", "action"))[:40]
    target = _str(record.get("node")) or "the balancer"
    fault = record.get("fault")
    if isinstance(fault, dict) and fault.get("type"):
        return f"chaos {action}: {target} -> {str(fault['type'])[:40]}"
    if record.get("kill_at") and _is_number(record.get("kill_at")):
        return f"chaos {action}: {target} (pid {_str(record.get('pid'))})"
    return f"chaos {action}: {target}"


def _short(url: str) -> str:
    return url.split("://", 1)[-1]


def _gossip_summary(doc: Any) -> Any:
    """A peer's `/gossip` cut to what the page draws: protocol and each member's state."""
    if doc is None or doc == "off":
        return doc
    if not isinstance(doc, dict):
        return None
    members = doc.get("members")
    if not isinstance(members, list):
        return None
    out = []
    for m in members[:MAX_GOSSIP_MEMBERS]:
        if not isinstance(m, dict):
            continue
        out.append(
            {
                "node": str(m.get("node", ""))[:200],
                "state": str(m.get("state", ""))[:32],
                "heartbeat": m.get("heartbeat") if _is_number(m.get("heartbeat")) else None,
                "incarnation": m.get("incarnation") if _is_number(m.get("incarnation")) else None,
                "generation": m.get("generation") if _is_number(m.get("generation")) else None,
            }
        )
    return {
        "protocol": str(doc.get("protocol", ""))[:64],
        "self": str(doc.get("self", ""))[:200],
        "members": out,
    }
