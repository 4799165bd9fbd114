"""`twlb sim check` against a second, independent checker on several hundred histories
the simulator produces: Raft, Multi-Paxos and PBFT, correct and with their deliberately
broken `--bug` variants, under random partitions and crashes; and each of them again with
one change: a completed read's value changed to one no operation wrote (never
linearizable), to an earlier write's (stale or not), or a compare-and-set's outcome
flipped. Any disagreement, on the verdict or on where the history stops being
linearizable, fails.

The reference here shares nothing with `twlb.sim.checker` but the event type: it pairs
the events itself, has its own model of the register, and searches breadth-first over
every set of operations that can have taken effect (an operation may join a set once
every operation that completed before it was invoked is in), with every model state each
set can end in. A history is linearizable iff some reachable set holds every operation
whose completion was seen. Where none does, the furthest completion reached is the
earliest completion missing from some reachable set, maximised over the sets: the checker
must name the operation completing there.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from click.testing import CliRunner
from twlb.sim.cli import command
from twlb.sim.history import EventType, History, HistoryEvent, Workload
from twlb.sim.runner import Fault, SimConfig, Simulation

#: (algorithm, nodes, protocol config): every `--bug` variant of the three protocols,
#: and each protocol as it should be.
VARIANTS = [
    ("raft", 5, {}),
    ("raft", 5, {"bug": "double-vote"}),
    ("raft", 3, {"bug": "commit-old-term"}),
    ("paxos", 5, {}),
    ("paxos", 5, {"bug": "no-phase1"}),
    ("pbft", 4, {}),
    ("pbft", 4, {"bug": "weak-quorums"}),
]
SEEDS = range(24)
DURATION = 4.0
#: Bound on the reference's configurations for one key: the histories are chosen small
#: enough that breadth-first search over every set stays cheap.
REFERENCE_LIMIT = 2_000_000
NEVER_WRITTEN = -1_000_000_007


def fault_schedule(rng: random.Random, nodes: int) -> list[Fault]:
    """Partitions and crashes, each healed within 0.3-1.5 s, a new one every 0.6-1.6 s."""
    ids = [f"node_{i}" for i in range(nodes)]
    faults, at = [], 0.4
    while at < DURATION - 1.0:
        if rng.random() < 0.5:
            side = set(rng.sample(ids, rng.randint(1, nodes // 2)))
            faults.append(
                Fault(at, "partition", (tuple(sorted(side)), tuple(sorted(set(ids) - side))))
            )
            faults.append(Fault(at + rng.uniform(0.3, 1.5), "heal"))
        else:
            node = rng.choice(ids)
            faults.append(Fault(at, "crash", (node,)))
            faults.append(Fault(at + rng.uniform(0.3, 1.5), "recover", (node,)))
        at += rng.uniform(0.6, 1.6)
    return sorted(faults, key=lambda f: f.at)


def simulate(algorithm: str, nodes: int, protocol: dict, seed: int) -> list[HistoryEvent]:
    config = SimConfig(
        algorithm=algorithm,
        nodes=nodes,
        seed=seed,
        duration=DURATION,
        clients=3,
        workload=Workload(keys=("a", "b"), timeout=0.5),
        faults=fault_schedule(random.Random(f"faults/{seed}"), nodes),
        byzantine={"node_0": "equivocate"} if protocol.get("bug") == "weak-quorums" else {},
        protocol=dict(protocol),
    )
    sim = Simulation(config)
    sim.run_until(DURATION + config.workload.timeout)
    return list(sim.history)


def with_a_read_never_written(events: list[HistoryEvent], rng: random.Random):
    """One completed read now returns a value no operation wrote: never linearizable."""
    reads = [k for k, e in enumerate(events) if e.type.value == "ok" and e.f == "read"]
    if not reads:
        return None
    written = {e.value for e in events if e.f == "write"}
    assert NEVER_WRITTEN not in written
    return replaced(events, rng.choice(reads), NEVER_WRITTEN)


def with_a_read_of_an_earlier_write(events: list[HistoryEvent], rng: random.Random):
    """One completed read now returns a value written to its key before it was invoked
    (or nothing): stale, unless concurrency allows it; either verdict can be right."""
    choices = []
    for k, e in enumerate(events):
        if e.type.value == "ok" and e.f == "read":
            earlier = {None} | {w.value for w in events[:k] if w.f == "write" and w.key == e.key}
            earlier.discard(e.value)
            if earlier:
                choices.append((k, sorted(earlier, key=str)))
    if not choices:
        return None
    k, values = rng.choice(choices)
    return replaced(events, k, rng.choice(values))


def with_a_cas_outcome_flipped(events: list[HistoryEvent], rng: random.Random):
    """One compare-and-set that swapped now reports it did not, or the reverse."""
    cas = [
        k
        for k, e in enumerate(events)
        if e.f == "cas" and (e.type.value == "ok" or (e.type.value == "fail" and not e.error))
    ]
    if not cas:
        return None
    k = rng.choice(cas)
    e = events[k]
    kind = EventType.FAIL if e.type is EventType.OK else EventType.OK
    changed = list(events)
    changed[k] = HistoryEvent(e.process, kind, e.f, e.value, key=e.key, time=e.time)
    return changed


def replaced(events: list[HistoryEvent], k: int, value) -> list[HistoryEvent]:
    changed = list(events)
    e = changed[k]
    changed[k] = HistoryEvent(e.process, e.type, e.f, value, key=e.key, time=e.time)
    return changed


MUTATIONS = [
    ("a read of a value never written", with_a_read_never_written),
    ("a read of an earlier write", with_a_read_of_an_earlier_write),
    ("a compare-and-set's outcome flipped", with_a_cas_outcome_flipped),
]


# -- the reference ------------------------------------------------------------------

INF = float("inf")


def reference_operations(events: list[HistoryEvent]) -> dict[str | None, list[dict]]:
    """Pair invocations and completions by process, per key. A completion `ok` took
    effect with its result; `fail` of a compare-and-set without an error completed
    without swapping; any other `fail` did not take effect; `info` or no completion at
    all may have taken effect, any time after the invocation (a read then says nothing)."""
    pending: dict[int, tuple[int, HistoryEvent]] = {}
    ops: dict[str | None, list[dict]] = defaultdict(list)
    for position, e in enumerate(events):
        if e.type.value == "invoke":
            pending[e.process] = (position, e)
            continue
        start, call = pending.pop(e.process)
        op = {"f": call.f, "arg": call.value, "call": start, "ret": position, "line": position}
        if e.type.value == "ok":
            op["out"] = e.value if call.f == "read" else "ok"
        elif e.type.value == "fail" and call.f == "cas" and e.error is None:
            op["out"] = "not-swapped"
        elif e.type.value == "fail" or call.f == "read":
            continue
        else:
            op["out"], op["ret"] = "unknown", INF
        ops[call.key].append(op)
    for start, call in pending.values():
        if call.f != "read":
            ops[call.key].append({"f": call.f, "arg": call.value, "call": start, "ret": INF,
                                  "out": "unknown", "line": None})  # fmt: skip
    return ops


def apply(state, op):
    """The register: (legal, next state). No value is None; "" reads as no value."""
    f, arg, out = op["f"], op["arg"], op["out"]
    if f == "read":
        return (out if out != "" else None) == state, state
    if f == "write":
        return True, arg if arg != "" else None
    if f == "append":
        value = (state or "") + arg
        return True, value if value != "" else None
    expected, new = arg
    expected = expected if expected != "" else None
    if out == "ok":
        return state == expected, new
    if out == "not-swapped":
        return state != expected, state
    return True, (new if state == expected else state)


def reference_check(ops: list[dict]) -> tuple[bool, int | None]:
    """(linearizable, the event position of the furthest completion reached)."""
    n = len(ops)
    before = [0] * n  # ops that completed before op j was invoked
    for j in range(n):
        for i in range(n):
            if ops[i]["ret"] < ops[j]["call"]:
                before[j] |= 1 << i
    seen = {(0, None)}
    layer = [(0, None)]
    must = sum(1 << i for i in range(n) if ops[i]["ret"] != INF)
    furthest = -1
    while layer:
        following = []
        for placed, state in layer:
            if placed & must == must:
                return True, None
            missing = [ops[i]["ret"] for i in range(n) if must >> i & 1 and not placed >> i & 1]
            furthest = max(furthest, min(missing))
            for j in range(n):
                if placed >> j & 1 or before[j] & placed != before[j]:
                    continue
                legal, after = apply(state, ops[j])
                config = (placed | 1 << j, after)
                if legal and config not in seen:
                    seen.add(config)
                    following.append(config)
        assert len(seen) <= REFERENCE_LIMIT, "history too large for the reference"
        layer = following
    return False, furthest


# -- the comparison -----------------------------------------------------------------


def histories() -> list[tuple[str, list[HistoryEvent]]]:
    out = []
    rng = random.Random(28)
    for algorithm, nodes, protocol in VARIANTS:
        name = algorithm + (f"--bug={protocol['bug']}" if protocol else "")
        for seed in SEEDS:
            events = simulate(algorithm, nodes, protocol, seed)
            out.append((f"{name} seed {seed}", events))
            for what, mutate in MUTATIONS:
                changed = mutate(events, rng)
                if changed is not None:
                    out.append((f"{name} seed {seed}, {what}", changed))
    return out


@pytest.fixture(scope="module")
def cases():
    return histories()


def test_twlb_sim_check_agrees_with_the_reference_on_simulator_histories(cases, tmp_path):
    runner = CliRunner()
    verdicts = {"linearizable": 0, "not linearizable": 0}
    natural_violations = 0
    for name, events in cases:
        path = tmp_path / "history.edn"
        History(events).write_edn(path)  # the file a user would check
        by_key = reference_operations(events)
        expected = {key: reference_check(ops) for key, ops in by_key.items()}
        linearizable = all(ok for ok, _ in expected.values())
        result = runner.invoke(command, ["check", str(path), "--json"])
        assert result.exit_code in (0, 1), (name, result.output)
        report = json.loads(result.output)
        assert report["linearizable"] is linearizable, name
        assert (result.exit_code == 0) is linearizable, name
        verdicts["linearizable" if linearizable else "not linearizable"] += 1
        if "never written" in name:
            assert not linearizable, name
        elif not linearizable and "," not in name:
            natural_violations += 1
        if not linearizable:
            ok, furthest = expected[report["failing_key"]]
            assert not ok, name
            # Lines of the written file are event positions + 1.
            assert report["cannot_place"]["completion_line"] == furthest + 1, name
    assert len(cases) >= 600
    assert verdicts["linearizable"] >= 200 and verdicts["not linearizable"] >= 300, verdicts
    # the broken variants are caught on their own, not only through changed reads
    assert natural_violations >= 3, natural_violations


def test_the_reference_passes_the_correct_protocols_and_finds_reads_never_written(cases):
    """The reference really decides: every unchanged history of a correct protocol is
    linearizable to it, every read of a value never written is not."""
    seen = set()
    for name, events in cases:
        outcome = [reference_check(ops)[0] for ops in reference_operations(events).values()]
        if "never written" in name:
            assert not all(outcome), name
            seen.add("never written")
        elif "," not in name and "--bug" not in name:
            assert all(outcome), name
            seen.add("correct")
    assert seen == {"never written", "correct"}
