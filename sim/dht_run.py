"""Checked runs of the replicated hash table (`twlb.sim.dht`) under faults, and sweeps of
them: `twlb sim dht`.

One run: N-way replicated table on `nodes` nodes, closed-loop clients each sending get,
put and delete of a few keys to a node drawn at random (they do not know which are
down), each written value unique, every operation recorded in Jepsen's terms (`ok`,
`fail` when certainly not applied, `info` when the outcome is unknown: no answer within
the client's timeout). Faults follow a schedule (`twlb.sim.runner.Fault` rows and the
aiming episodes of `twlb.sim.nemesis`) until `duration`; crashes never take down more
than N-1 nodes at once, so no key ever has all its homes down. Then the network heals,
every node recovers, clocks are reset, and the table is left `settle` seconds for
hinted hand-off and anti-entropy; then one client reads every key.

Checks, on every run:
- **linearizability** (strict mode): the history, key by key, against a register
  (`twlb.sim.checker`, kv model; a delete writes no value). Sloppy mode does not
  promise it: not applicable there.
- **lost writes** (both modes): every acknowledged write's clock (the context the client
  got back) is held, or descended from, by a record of its key somewhere in the table
  after the repair time.
- **stale reads**: reads that returned an older value than a write acknowledged before
  the read began, by real time alone (`DhtSimulation.stale_reads`). A violation in
  strict mode; counted, and expected, in sloppy mode.
- **convergence**: after the repair time and before the final reads (which would repair
  by themselves), every home of every key holds the same records and no hint is left.
- **availability**: with everything healed, every final read is answered.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twlb.sim.checker import SearchBudgetExceeded, check_history
from twlb.sim.dht import DhtAnswer, DhtConfig, DhtNode, DhtOp, Record, covers, reconcile
from twlb.sim.history import EventType, History, HistoryEvent, ProcessNumbers
from twlb.sim.kernel import Kernel
from twlb.sim.nemesis import Arena
from twlb.sim.network import NetworkConfig
from twlb.sim.runner import Fault, apply_fault, outcome, percentiles, planned_crashes
from twlb.sim.sweep import (
    Episode,
    check_nemeses,
    flatten,
    nemesis_of,
    random_schedule,
    run_seeds,
)

from twlb.protocol import ClientReply, ClientRequest, NodeId, Operation, OpKind

#: The nemeses a hash-table sweep may name (no leader to aim at: of the aiming ones, the
#: crash after an acknowledged write and clock faults apply).
DHT_NEMESES = (
    "crash",
    "ack-crash",
    "partition",
    "skew",
    "clock",
    "pause",
    "loss",
    "duplicate",
    "reorder",
    "bridge",
    "ring",
)


@dataclass(slots=True)
class DhtRunConfig:
    nodes: int = 6
    replication: int = 3
    write_quorum: int | None = None
    read_quorum: int | None = None
    mode: str = "strict"
    seed: int = 0
    duration: float = 20.0
    settle: float = 10.0
    latency_ms: tuple[float, float] = (10.0, 100.0)
    clients: int = 4
    keys: int = 6
    read_fraction: float = 0.45
    delete_fraction: float = 0.05
    client_timeout: float = 3.0
    faults: list[Fault] = field(default_factory=list)
    max_check_states: int = 2_000_000
    bug: str | None = None  # a deliberately broken variant of the table (`DHT_BUGS`)

    def __post_init__(self) -> None:
        if self.nodes < self.replication:
            raise ValueError(f"{self.nodes} nodes cannot hold {self.replication} replicas of a key")
        if not self.duration > 0 or self.settle < 0:
            raise ValueError("duration must be positive and settle not negative")
        if self.clients < 1 or self.keys < 1:
            raise ValueError("a run needs at least one client and one key")
        self.table_config()  # validates the quorums and the mode

    def table_config(self) -> DhtConfig:
        return DhtConfig(
            replication_factor=self.replication,
            write_quorum=self.write_quorum,
            read_quorum=self.read_quorum,
            mode=self.mode,
            bug=self.bug,
        )

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["faults"] = [f.as_json() for f in self.faults]
        out["latency_ms"] = list(self.latency_ms)
        return out


@dataclass(slots=True)
class OpRecord:
    """One client operation as the client saw it, with the clock its answer carried."""

    client: str
    f: str  # read | write (a delete is a write of no value)
    key: str
    value: Any
    invoked: float
    completed: float | None = None
    outcome: str = "pending"  # ok | fail | info
    clock: tuple[Any, ...] | None = None
    error: str | None = None


class DhtClient:
    """A closed-loop client: one operation at a time, each to a node drawn at random."""

    def __init__(
        self,
        run: DhtSimulation,
        name: str,
        processes: ProcessNumbers,
        stop_at: float,
    ) -> None:
        self.run = run
        self.kernel = run.kernel
        self.name = name
        self.processes = processes
        self.process = processes.take()
        self.number = self.process + 1
        self.stop_at = stop_at
        self.seq = 0
        self.pending: tuple[int, OpRecord] | None = None
        self.script: list[tuple[str, str]] | None = None  # (f, key) to do, then stop
        self.kernel.register_client(name, self.on_reply)

    def start(self, at: float) -> None:
        self.kernel.call_at(at, self.issue)

    def issue(self) -> None:
        now = self.kernel.now
        rng = self.kernel.rng
        cfg = self.run.config
        if self.script is not None:
            if not self.script:
                return
            f, key = self.script.pop(0)
            value = None
        else:
            if now >= self.stop_at:
                return
            key = rng.choice(self.run.keys)
            roll = rng.random()
            if roll < cfg.read_fraction:
                f, value = "read", None
            elif roll < cfg.read_fraction + cfg.delete_fraction:
                f, value = "write", None  # a delete
            else:
                f, value = "write", self.number * 1_000_000 + self.seq + 1
        self.seq += 1
        record = OpRecord(self.name, f, key, value, now)
        self.run.ops.append(record)
        self.pending = (self.seq, record)
        self.run.history.append(
            HistoryEvent(self.process, EventType.INVOKE, f, value, key=key, time=now)
        )
        if f == "read":
            op = Operation(OpKind.GET, key)
        elif value is None:
            op = Operation(DhtOp.DELETE, key)  # type: ignore[arg-type]
        else:
            op = Operation(OpKind.PUT, key, value)
        node = rng.choice(self.run.node_ids)
        self.kernel.send_request(self.name, node, ClientRequest(self.name, self.seq, op))
        self.kernel.call_after(cfg.client_timeout, self.on_timeout, self.seq)

    def complete(self, kind: EventType, answer: DhtAnswer | None, error: str | None) -> None:
        assert self.pending is not None
        _seq, record = self.pending
        now = self.kernel.now
        record.completed, record.outcome, record.error = now, kind.value, error
        value = record.value
        if kind is EventType.OK and answer is not None:
            record.clock = answer.clock
            if record.f == "read":
                value = record.value = answer.value
        self.run.history.append(
            HistoryEvent(self.process, kind, record.f, value, key=record.key, time=now, error=error)
        )
        self.pending = None
        if kind is EventType.INFO:
            self.process = self.processes.take()
        self.kernel.call_after(0.01, self.issue)

    def on_reply(self, reply: ClientReply, node: NodeId, now: float) -> None:
        if self.pending is None or reply.seq != self.pending[0]:
            return
        if reply.ok:
            self.complete(EventType.OK, reply.value, None)
        else:  # refused: certainly not applied (the table says "maybe" by not answering)
            self.complete(EventType.FAIL, None, reply.error or "refused")

    def on_timeout(self, seq: int) -> None:
        if self.pending is not None and self.pending[0] == seq:
            self.complete(EventType.INFO, None, "timeout")


class DhtSimulation:
    """One checked run of the hash table; `finish()` runs it and returns the report."""

    def __init__(self, config: DhtRunConfig) -> None:
        self.config = config
        table = config.table_config()
        self.kernel = Kernel(config.seed, NetworkConfig(config.latency_ms))
        self.network = self.kernel.network
        self.node_ids = [f"node_{i}" for i in range(config.nodes)]
        settings = {f: getattr(table, f) for f in DhtConfig.__dataclass_fields__}
        for node_id in self.node_ids:
            peers = [p for p in self.node_ids if p != node_id]
            self.kernel.spawn(DhtNode, node_id, peers, settings)
        self.keys = [f"k{i}" for i in range(config.keys)]
        self.history = History()
        self.ops: list[OpRecord] = []
        self.processes = ProcessNumbers()
        self.clients = [
            DhtClient(self, f"client_{i}", self.processes, config.duration)
            for i in range(config.clients)
        ]
        for i, client in enumerate(self.clients):
            client.start(0.2 + 0.01 * i)
        self.fault_errors: list[str] = []
        self.arena = Arena(
            self.kernel,
            self.node_ids,
            config.replication - 1,
            frozenset(),
            planned_crashes(config.faults),
            self.fault_errors,
        )
        for fault in config.faults:
            self.kernel.call_at(fault.at, self._apply_fault, fault)
        self.wall_seconds = 0.0

    def _apply_fault(self, fault: Fault) -> None:
        apply_fault(fault, self.arena)

    def _run(self, until: float) -> None:
        started = time.perf_counter()
        self.kernel.run(until=until)
        self.wall_seconds += time.perf_counter() - started

    def heal_all(self) -> None:
        network = self.network
        network.heal()
        for probability in ("set_loss", "set_duplicate", "set_reorder"):
            getattr(network, probability)(0.0)
        for node in sorted(network.skew):
            network.set_clock_skew(node, 0.0, 1.0)
        for node, state in sorted(network.down.items()):
            if state is not None:
                network.recover_node(node)

    def finish(self) -> dict[str, Any]:
        cfg = self.config
        self._run(cfg.duration + cfg.client_timeout)  # the last operations settle
        self.heal_all()
        healed = self.kernel.now
        self._run(healed + cfg.settle)
        convergence = self.check_convergence()
        table = self.table()
        reader = self.clients[0]
        reader.script = [("read", key) for key in self.keys]
        before = len(self.ops)
        reader.issue()
        self._run(self.kernel.now + (cfg.client_timeout + 0.1) * (len(self.keys) + 1))
        return self.report(convergence, table, self.ops[before:])

    # -- checks -----------------------------------------------------------------------
    def table(self) -> dict[str, tuple[Record, ...]]:
        """Every record of every key anywhere in the table (stores and hints)."""
        out: dict[str, list[Record]] = {}
        for node in self.kernel.nodes.values():
            for key, records in node.store.items():
                out.setdefault(key, []).extend(records)
            for bucket in node.hints.values():
                for key, records in bucket.items():
                    out.setdefault(key, []).extend(records)
        return {key: reconcile(records) for key, records in out.items()}

    def check_convergence(self) -> dict[str, Any]:
        nodes = self.kernel.nodes
        some = next(iter(nodes.values()))
        keys = sorted({k for node in nodes.values() for k in node.store})
        diverged = []
        for key in keys:
            homes = some.preference(key)
            held = {tuple(sorted(r.clock for r in nodes[h].store.get(key, ()))) for h in homes}
            if len(held) > 1:
                diverged.append(key)
        hints = sum(len(b) for node in nodes.values() for b in node.hints.values())
        ok = not diverged and not hints
        return {
            "verdict": "ok" if ok else "violation",
            "diverged_keys": diverged,
            "hints_left": hints,
            "after_s": self.config.settle,
        }

    def lost_writes(self, table: dict[str, tuple[Record, ...]]) -> list[OpRecord]:
        return [
            op
            for op in self.ops
            if op.f == "write"
            and op.outcome == "ok"
            and op.clock is not None
            and not covers(table.get(op.key, ()), op.clock)
        ]

    def stale_reads(self) -> list[OpRecord]:
        """Reads that returned an older value than a write acknowledged before they
        began, judged by real time alone (not by the table's versions): the read's value
        was written by w_v (values are unique; no value: a delete or nothing yet), and
        some write acknowledged before the read began had begun after every write that
        could have produced that value had been acknowledged."""
        writes = [op for op in self.ops if op.f == "write"]
        acked = [op for op in writes if op.outcome == "ok"]
        by_value = {op.value: op for op in writes if op.value is not None}
        stale = []
        for read in self.ops:
            if read.f != "read" or read.outcome != "ok":
                continue
            if read.value is not None:
                source = by_value.get(read.value)
                sources = [source] if source is not None else []
            else:  # the initial state (ended by no write) or any delete
                sources = [op for op in writes if op.value is None and op.key == read.key]
                sources.append(None)
            if not sources and read.value is not None:
                continue  # a value nobody wrote: the linearizability check reports it
            ends = [
                float("-inf") if w is None else (w.completed if w.outcome == "ok" else None)
                for w in sources
            ]
            if any(end is None for end in ends):
                continue  # the value may come from a write of unknown outcome: never stale
            last_source = max(ends)  # every source was over by then
            if any(
                w.key == read.key
                and w.completed < read.invoked
                and w.invoked > last_source
                and w.value != read.value
                for w in acked
            ):
                stale.append(read)
        return stale

    def check_linearizability(self) -> dict[str, Any]:
        if self.config.mode != "strict":
            return {"verdict": "not-applicable", "reason": "sloppy quorums do not promise it"}
        try:
            verdict = check_history(self.history, "kv", max_states=self.config.max_check_states)
        except SearchBudgetExceeded as err:
            return {"verdict": "unknown", "reason": str(err)}
        out = verdict.as_dict()
        out["verdict"] = "ok" if verdict.linearizable else "violation"
        return out

    def report(
        self,
        convergence: dict[str, Any],
        table: dict[str, tuple[Record, ...]],
        final: Sequence[OpRecord],
    ) -> dict[str, Any]:
        cfg = self.config
        lost = self.lost_writes(table)
        stale = self.stale_reads()
        unanswered = [op.key for op in final if op.outcome != "ok"]
        unanswered += self.keys[len(final) :]
        strict = cfg.mode == "strict"
        checks = {
            "linearizability": self.check_linearizability(),
            "lost_writes": {
                "verdict": "violation" if lost else "ok",
                "lost": [_op_json(op) for op in lost[:10]],
            },
            "stale_reads": {
                "verdict": ("violation" if stale else "ok") if strict else "not-applicable",
                "count": len(stale),
                "examples": [_op_json(op) for op in stale[:5]],
            },
            "convergence": convergence,
            "availability": {
                "verdict": "violation" if unanswered else "ok",
                "unanswered_final_reads": unanswered,
            },
        }
        outcomes = Counter(op.outcome for op in self.ops)
        writes = [op for op in self.ops if op.f == "write"]
        latency = [op.completed - op.invoked for op in self.ops if op.outcome == "ok"]
        events = Counter(ev[0] for _t, _n, ev in self.kernel.events if ev)
        return {
            "config": cfg.as_json(),
            "seed": cfg.seed,
            "operations": dict(outcomes) | {"total": len(self.ops)},
            "writes_acknowledged": sum(op.outcome == "ok" for op in writes),
            "writes_indeterminate": sum(op.outcome == "info" for op in writes),
            "reads_ok": sum(op.outcome == "ok" and op.f == "read" for op in self.ops),
            "stale_reads": len(stale),
            "lost_writes": len(lost),
            "latency_ms": percentiles(latency),
            "protocol_events": dict(sorted(events.items())),
            "messages": self.kernel.stats.as_dict(),
            "faults": len(self.network.log),
            "fault_errors": self.fault_errors,
            "wall_seconds": round(self.wall_seconds, 4),
            "checks": checks,
            "outcome": outcome(checks),
            "passed": outcome(checks) == "passed",
        }


def _op_json(op: OpRecord) -> dict[str, Any]:
    return {
        "client": op.client,
        "f": op.f,
        "key": op.key,
        "value": op.value,
        "invoked": round(op.invoked, 6),
        "completed": None if op.completed is None else round(op.completed, 6),
        "clock": [list(x) for x in op.clock] if op.clock else None,
    }


# ---- sweeps -------------------------------------------------------------------------


@dataclass(slots=True)
class DhtSweepSettings:
    nodes: int = 6
    replication: int = 3
    write_quorum: int | None = None
    read_quorum: int | None = None
    mode: str = "strict"
    duration: float = 20.0
    settle: float = 10.0
    clients: int = 4
    keys: int = 6
    nemeses: tuple[str, ...] = ("crash", "partition", "skew")
    episodes: int = 4
    mix: bool = False
    bug: str | None = None
    max_check_states: int | None = None

    def __post_init__(self) -> None:
        self.nemeses = check_nemeses(self.nemeses)
        unfit = sorted(set(self.nemeses) - set(DHT_NEMESES))
        if unfit:
            raise ValueError(
                f"nemesis {', '.join(unfit)} does not apply to the hash table; "
                f"choose from {', '.join(DHT_NEMESES)}"
            )
        self.config(0)  # validates the rest

    def nemesis_of(self, seed: int) -> tuple[str, ...]:
        return nemesis_of(self.nemeses, seed, self.mix)

    def config(self, seed: int) -> tuple[DhtRunConfig, list[Episode]]:
        rng = random.Random(f"dht-schedule/{seed}")
        ids = [f"node_{i}" for i in range(self.nodes)]
        schedule = random_schedule(
            rng,
            ids,
            self.replication - 1,
            self.nemesis_of(seed),
            1.0,
            max(2.0, self.duration - 1.0),
            self.episodes,
        )
        budget = (
            {} if self.max_check_states is None else {"max_check_states": self.max_check_states}
        )
        return DhtRunConfig(
            **budget,
            nodes=self.nodes,
            replication=self.replication,
            write_quorum=self.write_quorum,
            read_quorum=self.read_quorum,
            mode=self.mode,
            seed=seed,
            duration=self.duration,
            settle=self.settle,
            clients=self.clients,
            keys=self.keys,
            faults=flatten(schedule),
            bug=self.bug,
        ), schedule


def _one(args: tuple[DhtSweepSettings, int]) -> dict[str, Any]:
    settings, seed = args
    config, _schedule = settings.config(seed)
    started = time.perf_counter()
    report = DhtSimulation(config).finish()
    return {
        "seed": seed,
        "nemesis": "+".join(settings.nemesis_of(seed)),
        "outcome": report["outcome"],
        "failed_checks": [k for k, c in report["checks"].items() if c["verdict"] == "violation"],
        "undecided_checks": [k for k, c in report["checks"].items() if c["verdict"] == "unknown"],
        "writes_acknowledged": report["writes_acknowledged"],
        "writes_indeterminate": report["writes_indeterminate"],
        "reads_ok": report["reads_ok"],
        "lost_writes": report["lost_writes"],
        "stale_reads": report["stale_reads"],
        "operations": report["operations"]["total"],
        "faults": report["faults"],
        "wall_seconds": time.perf_counter() - started,
    }


def dht_sweep(
    settings: DhtSweepSettings,
    seeds: Sequence[int],
    workers: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    time_limit: float | None = None,
) -> list[dict[str, Any]]:
    """Run every seed (in `workers` processes), results in seed order; stop starting new
    ones after `time_limit` seconds of wall time."""
    jobs = [(settings, seed) for seed in seeds]
    return run_seeds(_one, jobs, workers, on_result, time_limit)


def summarise_dht(results: Sequence[dict[str, Any]], wall: float) -> dict[str, Any]:
    failures = Counter(c for r in results for c in r["failed_checks"])
    return {
        "runs": len(results),
        "passed": sum(r["outcome"] == "passed" for r in results),
        "violations": sum(r["outcome"] == "violation" for r in results),
        "undecided": sum(r["outcome"] == "undecided" for r in results),
        "violations_by_check": dict(failures),
        "failing_seeds": [r["seed"] for r in results if r["outcome"] == "violation"],
        "undecided_seeds": [r["seed"] for r in results if r["outcome"] == "undecided"],
        "writes_acknowledged": sum(r["writes_acknowledged"] for r in results),
        "writes_indeterminate": sum(r["writes_indeterminate"] for r in results),
        "reads_ok": sum(r["reads_ok"] for r in results),
        "lost_writes": sum(r["lost_writes"] for r in results),
        "stale_reads": sum(r["stale_reads"] for r in results),
        "faults_injected": sum(r["faults"] for r in results),
        "wall_seconds": round(wall, 2),
    }


__all__ = [
    "DHT_NEMESES",
    "DhtClient",
    "DhtRunConfig",
    "DhtSimulation",
    "DhtSweepSettings",
    "OpRecord",
    "dht_sweep",
    "summarise_dht",
]
