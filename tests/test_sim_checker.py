"""The linearizability checker: agreement with every conformance history's known verdict,
with a brute-force reference on small random histories, and the `twlb sim check` CLI."""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from twlb.sim.checker import check_history, check_operations, search, step
from twlb.sim.cli import command
from twlb.sim.history import (
    EventType,
    History,
    HistoryError,
    HistoryEvent,
    Op,
    pair_operations,
    parse_edn,
    read_history,
)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """`../shared` beside the repository: beside this checkout (CI's clone), or, in a git
    worktree, beside the main checkout the worktree belongs to."""
    here = REPO.parent / "shared"
    if here.is_dir():
        return here
    common = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return Path(common).parent.parent / "shared" if common else here


CONFORMANCE = shared_dir() / "conformance"


def conformance_cases() -> list[tuple[str, Path, str, bool]]:
    # Missing data is a failure, not a skip: CI lays shared/ beside the clone.
    assert CONFORMANCE.is_dir(), f"conformance histories missing at {CONFORMANCE}"
    verdicts = {}
    for line in (CONFORMANCE / "jepsen-etcd" / "verdicts.txt").read_text().splitlines():
        if line.strip():
            name, verdict = line.split()
            verdicts[name] = verdict == "true"
    cases = []
    for path in sorted((CONFORMANCE / "jepsen-etcd").glob("etcd_*.log")):
        cases.append((path.name, path, "register", verdicts[path.name]))
    for path in sorted((CONFORMANCE / "kv").glob("c*-*.txt")):
        cases.append((path.name, path, "kv", path.stem.endswith("-ok")))
    return cases


def test_conformance_set_is_complete():
    cases = conformance_cases()
    assert len([c for c in cases if c[2] == "register"]) == 52  # 000..052 without 095
    assert len([c for c in cases if c[2] == "kv"]) == 4
    assert {c[3] for c in cases} == {True, False}


@pytest.mark.parametrize(
    "name, path, model, expected",
    conformance_cases(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_checker_agrees_with_every_conformance_verdict(name, path, model, expected):
    verdict = check_history(read_history(path), model)
    assert verdict.linearizable is expected, name
    if not expected:
        prefix = verdict.prefix
        assert prefix and not check_history(prefix, model, shortest_prefix=False).linearizable
        assert check_history(prefix[:-1], model, shortest_prefix=False).linearizable


def brute_force(ops: list[Op]) -> bool:
    """Every permutation that respects real time, replayed on the model."""
    for order in itertools.permutations(range(len(ops))):
        placed = set()
        ok, state = True, None
        for i in order:
            later = [j for j in range(len(ops)) if j not in placed and j != i]
            if any(ops[j].end is not None and ops[j].end < ops[i].start for j in later):
                ok = False
                break
            legal, state = step(state, ops[i].f, ops[i].value, ops[i].output)
            if not legal:
                ok = False
                break
            placed.add(i)
        if ok:
            return True
    return False


def random_ops(rng: random.Random, n: int) -> list[Op]:
    spans = []
    for i in range(n):
        a = rng.randint(0, 12)
        spans.append((a, a + rng.randint(1, 6), i))
    points = sorted([(a, 0, i) for a, _b, i in spans] + [(b, 1, i) for _a, b, i in spans])
    position = {(kind, i): p for p, (_t, kind, i) in enumerate(points)}
    ops = []
    for i in range(n):
        f = rng.choice(["read", "write", "cas", "append"])
        unknown = f != "read" and rng.random() < 0.25
        end = None if unknown else position[(1, i)]
        if f == "read":
            value, output = None, rng.choice([None, "a", "b", "ab"])
        elif f in ("write", "append"):
            value, output = rng.choice(["a", "b"]), None if unknown else True
        else:
            value = (rng.choice([None, "a", "b"]), rng.choice(["a", "b"]))
            output = None if unknown else rng.choice([True, False])
        ops.append(Op(0, f, None, value, output, position[(0, i)], end, EventType.OK))
    return sorted(ops, key=lambda op: op.start)


def test_search_agrees_with_brute_force_on_random_small_histories():
    rng = random.Random(15)
    outcomes = set()
    for _ in range(600):
        ops = random_ops(rng, rng.randint(1, 5))
        expected = brute_force(ops)
        assert search(ops).linearizable is expected, ops
        outcomes.add(expected)
    assert outcomes == {True, False}


def test_linearization_order_is_returned_and_replays():
    rng = random.Random(3)
    for _ in range(200):
        ops = random_ops(rng, 5)
        result = search(ops)
        if result.linearizable:
            state = None
            for i in result.order:
                legal, state = step(state, ops[i].f, ops[i].value, ops[i].output)
                assert legal
            assert sorted(result.order) == list(range(len(ops)))


def ev(process, kind, f, value=None, key="k", error=None):
    return HistoryEvent(process, EventType(kind), f, value, key=key, error=error)


def test_stale_read_after_acknowledged_write_is_caught():
    history = [
        ev(0, "invoke", "write", 1),
        ev(0, "ok", "write", 1),
        ev(1, "invoke", "read"),
        ev(1, "ok", "read", None),
    ]
    verdict = check_history(history, "register")
    assert not verdict.linearizable and len(verdict.prefix) == 4


def test_unknown_write_may_take_effect_or_not():
    history = [ev(0, "invoke", "write", 1), ev(0, "info", "write", 1)]
    seen_new = history + [ev(1, "invoke", "read"), ev(1, "ok", "read", 1)]
    seen_old = history + [ev(1, "invoke", "read"), ev(1, "ok", "read", None)]
    flip = seen_new + [ev(2, "invoke", "read"), ev(2, "ok", "read", None)]
    assert check_history(seen_new, "register").linearizable
    assert check_history(seen_old, "register").linearizable
    assert not check_history(flip, "register").linearizable


def test_failed_cas_constrains_but_a_refused_operation_does_not():
    written = [ev(0, "invoke", "write", 1), ev(0, "ok", "write", 1)]
    cas_fail = written + [ev(1, "invoke", "cas", (1, 2)), ev(1, "fail", "cas", (1, 2))]
    refused = written + [
        ev(1, "invoke", "cas", (1, 2)),
        ev(1, "fail", "cas", (1, 2), error="not-leader"),
        ev(2, "invoke", "write", 9),
        ev(2, "fail", "write", 9, error="not-leader"),
        ev(3, "invoke", "read"),
        ev(3, "ok", "read", 1),
    ]
    assert not check_history(cas_fail, "register").linearizable
    assert check_history(refused, "register").linearizable


def test_keys_are_checked_independently():
    history = [
        ev(0, "invoke", "write", 1, key="a"),
        ev(0, "ok", "write", 1, key="a"),
        ev(1, "invoke", "read", key="b"),
        ev(1, "ok", "read", None, key="b"),
        ev(1, "invoke", "read", key="a"),
        ev(1, "ok", "read", 2, key="a"),
    ]
    verdict = check_history(history, "kv")
    assert not verdict.linearizable and verdict.failing_key == "a"
    assert all(e.key == "a" for e in verdict.prefix)


def test_edn_export_reads_back_identically():
    history = History(
        [
            HistoryEvent(0, EventType.INVOKE, "cas", (None, 2), key="x", time=1.5),
            HistoryEvent(
                0, EventType.FAIL, "cas", (None, 2), key="x", time=1.6, error="not-leader"
            ),
            HistoryEvent(1, EventType.INVOKE, "append", 'say "hi", then', key="y", time=2.0),
            HistoryEvent(1, EventType.INFO, "append", 'say "hi", then', key="y", time=3.0),
        ]
    )
    text = history.to_edn()
    assert (
        text.splitlines()[0]
        == '{:process 0, :type :invoke, :f :cas, :key "x", :value [nil 2], :time 1500000000}'
    )
    back = parse_edn(text)
    assert [(e.process, e.type, e.f, e.value, e.key, e.time, e.error) for e in back] == [
        (e.process, e.type, e.f, e.value, e.key, e.time, e.error) for e in history
    ]


@pytest.mark.parametrize(
    "events, message",
    [
        ([ev(0, "ok", "read", 1)], "never invoked"),
        ([ev(0, "invoke", "read"), ev(0, "invoke", "read")], "invoked again"),
        ([ev(0, "invoke", "read"), ev(0, "ok", "write", 1)], "completed :write"),
        ([ev(0, "invoke", "cas", 3), ev(0, "ok", "cas", 3)], r"\[FROM TO\]"),
    ],
)
def test_malformed_histories_are_refused_by_name(events, message):
    with pytest.raises(HistoryError, match=message):
        pair_operations(events)


def test_model_without_append_refuses_it():
    ops = pair_operations([ev(0, "invoke", "append", "a"), ev(0, "ok", "append", "a")])
    with pytest.raises(HistoryError, match="no :append"):
        check_operations(ops, "register")


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(command, ["check", str(CONFORMANCE / "kv" / "c01-ok.txt"), "--model", "kv"])
    assert ok.exit_code == 0 and "linearizable" in ok.output
    bad = runner.invoke(
        command, ["check", str(CONFORMANCE / "jepsen-etcd" / "etcd_050.log"), "--model", "register"]
    )
    assert bad.exit_code == 1
    assert "NOT linearizable" in bad.output and "shortest prefix" in bad.output
    junk = tmp_path / "junk.edn"
    junk.write_text("{:process 0, :type :invoke\n")
    assert runner.invoke(command, ["check", str(junk)]).exit_code == 2
    assert runner.invoke(command, ["check", str(tmp_path / "missing.edn")]).exit_code == 2
    wrong_model = runner.invoke(
        command, ["check", str(CONFORMANCE / "kv" / "c01-ok.txt"), "--model", "register"]
    )
    assert wrong_model.exit_code == 2 and "no :append" in wrong_model.output


def test_cli_search_budget_gives_up_with_its_own_exit_code():
    path = str(CONFORMANCE / "jepsen-etcd" / "etcd_002.log")
    result = CliRunner().invoke(
        command, ["check", path, "--model", "register", "--max-states", "1000"]
    )
    assert result.exit_code == 3 and "undecided" in result.output
