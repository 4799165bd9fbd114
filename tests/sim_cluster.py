"""Test support for the protocol tests: a cluster of one algorithm on the real kernel,
and closed-loop clients that follow redirects, retry on timeout with the same
(client, seq) and record what was acknowledged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twlb.sim.invariants import check_invariants
from twlb.sim.kernel import Kernel
from twlb.sim.network import NetworkConfig
from twlb.sim.pbft import ReplyQuorum

from twlb.protocol import ClientReply, ClientRequest, Operation, OpKind


@dataclass
class LoopClient:
    """Issues PUT key=client-i, then GET, then CAS, one at a time, retrying each until a
    definite answer; `acked` holds (request, reply) in order."""

    kernel: Kernel
    name: str
    nodes: list[str]
    timeout: float = 1.0
    quorum: Any = None  # a PBFT ReplyQuorum factory: accept only f+1 matching replies
    broadcast_on_retry: bool = False
    stop_at: float = float("inf")
    seq: int = 0
    target: int = 0
    pending: ClientRequest | None = None
    collector: Any = None
    acked: list[tuple[ClientRequest, ClientReply]] = field(default_factory=list)

    def begin(self, at: float = 0.0) -> None:
        self.kernel.register_client(self.name, self.on_reply)
        self.target = sum(map(ord, self.name)) % len(self.nodes)
        self.kernel.call_at(at, self.next_operation)

    def next_operation(self) -> None:
        if self.kernel.now >= self.stop_at:
            self.pending = None
            return
        self.seq += 1
        key = f"k{(self.seq - 1) // 3 % 3}"  # PUT, GET, CAS of one key, then the next
        step = self.seq % 3
        if step == 1:
            op = Operation(OpKind.PUT, key, f"{self.name}-{self.seq}")
        elif step == 2:
            op = Operation(OpKind.GET, key)
        else:
            op = Operation(OpKind.CAS, key, (f"{self.name}-{self.seq - 2}", f"{self.name}-x"))
        self.pending = ClientRequest(self.name, self.seq, op)
        self.collector = self.quorum() if self.quorum else None
        self.send(broadcast=False)

    def send(self, broadcast: bool) -> None:
        request = self.pending
        targets = self.nodes if broadcast else [self.nodes[self.target]]
        for node in targets:
            self.kernel.send_request(self.name, node, request)
        self.kernel.call_after(self.timeout, self.on_timeout, request.seq)

    def on_timeout(self, seq: int) -> None:
        if self.pending is None or self.pending.seq != seq:
            return
        self.target = (self.target + 1) % len(self.nodes)
        self.send(broadcast=self.broadcast_on_retry)

    def on_reply(self, reply: ClientReply, node: str, now: float) -> None:
        if self.pending is None or reply.seq != self.pending.seq:
            return
        if reply.error == "not-leader":
            if reply.leader_hint is not None and reply.leader_hint in self.nodes:
                self.target = self.nodes.index(reply.leader_hint)
                self.kernel.call_after(0.01, self._resend, reply.seq)
            return
        if self.collector is not None:
            reply = self.collector.add(reply, node)
            if reply is None:
                return
        self.acked.append((self.pending, reply))
        self.pending = None
        self.kernel.call_after(0.005, self.next_operation)

    def _resend(self, seq: int) -> None:
        if self.pending is not None and self.pending.seq == seq:
            for node in [self.nodes[self.target]]:
                self.kernel.send_request(self.name, node, self.pending)


def build(
    algorithm: type,
    n: int,
    seed: int,
    config: dict | None = None,
    clients: int = 2,
    net: dict | None = None,
    client_options: dict | None = None,
) -> tuple[Kernel, list[str], list[LoopClient]]:
    kernel = Kernel(seed=seed, network=NetworkConfig(**(net or {"latency_ms": (5, 20)})))
    ids = [f"node_{i}" for i in range(n)]
    for node_id in ids:
        kernel.spawn(algorithm, node_id, [p for p in ids if p != node_id], config or {})
    loop = [LoopClient(kernel, f"c{i}", ids, **(client_options or {})) for i in range(clients)]
    for client in loop:
        client.begin(0.05)
    return kernel, ids, loop


def faulty_cluster(
    algorithm: Any, name: str, n: int, seed: int, config: dict[str, Any], *, faults_until: float
) -> tuple[Kernel, list[str], list[LoopClient], frozenset[str]]:
    """n nodes of `algorithm` with three clients (PBFT's waiting for f+1 matching replies)
    on a 5-30 ms network, under random faults every 0.3 s until `faults_until` that crash
    and isolate leaders often and spare the Byzantine replicas; not yet run."""
    import random

    byzantine = frozenset(config.get("byzantine", {}))
    options = (
        {"quorum": lambda: ReplyQuorum(n), "broadcast_on_retry": True} if name == "pbft" else {}
    )
    kernel, ids, clients = build(
        algorithm,
        n,
        seed,
        config=config,
        clients=3,
        net={"latency_ms": (5, 30)},
        client_options=options,
    )
    random_faults(
        kernel,
        ids,
        random.Random(seed),
        until=faults_until,
        every=0.3,
        leader_crashes=0.1,
        leader_isolations=0.5,
        spare=byzantine,
    )
    return kernel, ids, clients, byzantine


def violations(name: str, kernel: Kernel, ids: list[str], **context: Any) -> list:
    return check_invariants(name, kernel.events, nodes=ids, end=kernel.now, **context)


def acked_ops(clients: list[LoopClient]) -> int:
    return sum(len(c.acked) for c in clients)


def events_of(kernel: Kernel, kind: str, node: str | None = None) -> list[tuple]:
    return [(t, n, e) for t, n, e in kernel.events if e[0] == kind and (node is None or n == node)]


def random_faults(
    kernel: Kernel,
    ids: list[str],
    rng,
    *,
    until: float,
    every: float = 0.7,
    crashes: bool = True,
    spare: frozenset = frozenset(),
    leader_crashes: float = 0.0,
    leader_isolations: float = 0.0,
) -> None:
    """Schedule a random fault every `every` seconds (partition, heal, crash or
    recover, loss) up to `until`, then heal everything at `until`. At most a minority
    is down at once; `spare` nodes are never crashed (Byzantine ones, whose crash would
    change the fault count). With probability `leader_crashes` a fault is a crash of
    the current leader, followed soon by a recovery, and with `leader_isolations` a cut
    of the current leader from every other node (until the next heal)."""
    t = 0.3
    while t < until:
        roll = rng.random()
        if roll < leader_crashes:
            kernel.call_at(t, crash_a_leader, kernel, rng)
            kernel.call_at(t + rng.uniform(0.05, 0.5), recover_one, kernel, rng)
        elif roll < leader_crashes + leader_isolations:
            kernel.call_at(t, isolate_a_leader, kernel, rng)
        elif roll < 0.3:
            cut = rng.sample(ids, rng.randint(1, len(ids) // 2))
            rest = [n for n in ids if n not in cut]
            kernel.call_at(t, kernel.network.heal)
            kernel.call_at(t, kernel.network.create_partition, cut, rest)
        elif roll < 0.45:
            kernel.call_at(t, kernel.network.heal)
        elif roll < 0.75 and crashes:
            if rng.random() < 0.5:
                kernel.call_at(t, recover_one, kernel, rng)
            else:
                kernel.call_at(t, crash_one, kernel, rng, sorted(set(ids) - spare))
        else:
            kernel.call_at(t, kernel.network.set_loss, rng.choice([0.0, 0.05, 0.2]))
        t += every * (0.5 + rng.random())
    kernel.call_at(until, kernel.network.heal)
    kernel.call_at(until, kernel.network.set_loss, 0.0)
    kernel.call_at(until, recover_all, kernel)


def is_leader(node: Any) -> bool:
    """Raft's leader, Multi-Paxos's leading proposer or PBFT's primary."""
    if hasattr(node, "primary"):
        return node.primary() == node.node_id and not node.in_view_change
    return getattr(node, "role", None) == "leader" or getattr(node, "leading", False)


def _may_crash(kernel: Kernel) -> bool:
    return len(kernel.network.down) + 1 <= (len(kernel.spawned) - 1) // 2


def crash_one(kernel: Kernel, rng, candidates: list[str]) -> None:
    up = [n for n in candidates if n in kernel.nodes]
    if up and _may_crash(kernel):
        kernel.network.fail_node(rng.choice(up))


def crash_a_leader(kernel: Kernel, rng) -> None:
    crash_one(kernel, rng, sorted(n for n, node in kernel.nodes.items() if is_leader(node)))


def isolate_a_leader(kernel: Kernel, rng) -> None:
    leaders = sorted(n for n, node in kernel.nodes.items() if is_leader(node))
    if leaders:
        kernel.network.heal()
        kernel.network.isolate(rng.choice(leaders))


def recover_one(kernel: Kernel, rng) -> None:
    down = sorted(kernel.network.down)
    if down:
        kernel.network.recover_node(rng.choice(down))


def recover_all(kernel: Kernel) -> None:
    for node in sorted(kernel.network.down):
        kernel.network.recover_node(node)
