"""The linearizability checker: agreement with every conformance history's known verdict
(tests/data/jepsen/, inside the repository), the forms it reads, a brute-force reference
on small random histories, its budgets, and the `twlb sim check` command line."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import edn_format
import pytest
from click.testing import CliRunner
from twlb.processes.managed import twlb_argv
from twlb.sim import edn
from twlb.sim.checker import (
    MemoryBudgetExceeded,
    SearchBudgetExceeded,
    TimeBudgetExceeded,
    check_history,
    check_operations,
    search,
    step,
)
from twlb.sim.cli import command, parse_size
from twlb.sim.history import (
    EventType,
    History,
    HistoryError,
    HistoryEvent,
    Op,
    pair_operations,
    parse_edn,
    parse_etcd_log,
    parse_history,
    read_history,
)

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO / "tests" / "data" / "jepsen"

#: Configurations the search may explore on any one conformance history: the most any
#: of them needs is about 110,000 (etcd_002.log); a search that loses its pruning
#: explodes far past this, so the bound catches a slower checker without timing it.
MAX_CONFORMANCE_STATES = 400_000


def conformance_cases() -> list[tuple[str, Path, str, bool]]:
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
    etcd = [c for c in cases if c[2] == "register"]
    assert len(etcd) == 102  # etcd_000..etcd_102 without 095 (its cluster never started)
    assert {c[0] for c in cases if c[2] == "kv"} == {
        f"c{n}-{v}.txt" for n in ("01", "10", "50") for v in ("ok", "bad")
    }
    assert {c[3] for c in cases} == {True, False}
    assert sum(c[3] for c in etcd) == 23
    # Porcupine's own corpus has logs whose columns are runs of spaces, not tabs.
    spaced = [c for c in etcd if "\t" not in c[1].read_text()]
    assert [c[0] for c in spaced] == ["etcd_100.log", "etcd_101.log", "etcd_102.log"]


@pytest.mark.parametrize(
    "name, path, model, expected",
    conformance_cases(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_checker_agrees_with_every_conformance_verdict(name, path, model, expected):
    verdict = check_history(read_history(path), model)
    assert verdict.linearizable is expected, name
    assert sum(k.states for k in verdict.keys) <= MAX_CONFORMANCE_STATES
    if expected:
        return
    # The failing prefix ends at the completion no linearization gets past: one event
    # less is linearizable on its own, and (on every history of this set) the prefix
    # itself is not.
    prefix = verdict.prefix
    assert prefix and prefix[-1].type is not EventType.INVOKE
    assert check_history(prefix[:-1], model).linearizable
    assert not check_history(prefix, model).linearizable
    stuck = verdict.failing_operations[verdict.stuck]
    assert stuck.end_line == prefix[-1].line


def test_a_failing_key_is_found_without_waiting_for_the_hard_ones():
    """c50-bad: some keys fail within a few thousand configurations, others would run
    to millions; searching keys interleaved stops at the first failure."""
    verdict = check_history(read_history(CONFORMANCE / "kv" / "c50-bad.txt"), "kv")
    assert not verdict.linearizable
    assert sum(k.states for k in verdict.keys) < 100_000
    undecided = [k for k in verdict.keys if k.linearizable is None]
    assert undecided, "the other keys were stopped, not searched to the end"
    failing = [k for k in verdict.keys if k.linearizable is False]
    assert [k.key for k in failing] == [verdict.failing_key]


# -- the forms read ---------------------------------------------------------------------


def test_etcd_log_columns_may_be_separated_by_any_whitespace():
    tabs = (
        "INFO  jepsen.util - 3\t:invoke\t:cas\t[1 2]\nINFO  jepsen.util - 3\t:fail\t:cas\t[1 2]\n"
    )
    spaces = "INFO jepsen.util -  3   :invoke :cas  [1 2]\nINFO jepsen.util - 3 :fail  :cas [1 2]\n"
    mixed = (
        "INFO\tjepsen.util\t-\t3 \t:invoke\t :cas [1 2]  \nINFO jepsen.util - 3 :fail :cas\t[1 2]\n"
    )
    parsed = [
        [(e.process, e.type, e.f, e.value) for e in parse_etcd_log(text)]
        for text in (tabs, spaces, mixed)
    ]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0][0] == (3, EventType.INVOKE, "cas", (1, 2))


def test_etcd_log_with_timestamps_errors_and_a_nemesis():
    text = "\n".join(
        [
            "2017-03-01 12:00:00,001{GMT}\tINFO\t[jepsen worker 0] jepsen.util: 0\t:invoke\t:write\t3",
            "INFO jepsen.core - Running test",
            "INFO jepsen.util - :nemesis\t:info\t:start\tnil",
            "2017-03-01 12:00:00,002{GMT}\tINFO\t[jepsen worker 0] jepsen.util: 0\t:info\t:write\t3\t:timeout",
            "INFO jepsen.util - 1\t:invoke\t:read\tnil",
            "INFO jepsen.util - 1\t:fail\t:read\t:timed-out",
        ]
    )
    events = list(parse_etcd_log(text))
    assert [(e.process, e.type.value, e.f, e.value, e.error, e.line) for e in events] == [
        (0, "invoke", "write", 3, None, 1),
        (0, "info", "write", 3, "timeout", 4),
        (1, "invoke", "read", None, None, 5),
        (1, "fail", "read", None, "timed-out", 6),
    ]


def test_a_malformed_operation_line_is_refused_by_line_number():
    text = "INFO jepsen.util - 0\t:invoke\t:read\tnil\nINFO jepsen.util - 0\t:okay\t:read\t1\n"
    with pytest.raises(HistoryError, match=r"line 2: unknown :type 'okay'"):
        parse_etcd_log(text)
    with pytest.raises(HistoryError, match=r"line 1: unknown operation :txn"):
        parse_etcd_log("INFO jepsen.util - 0\t:invoke\t:txn\t[[:r 1 nil]]\n")


def test_jepsen_edn_with_index_time_nemesis_and_a_vector_around_it():
    text = """[{:type :invoke, :f :write, :value 1, :process 0, :time 1000, :index 0}
{:type :info, :f :start, :value nil, :process :nemesis, :time 1500, :index 1}
{:type :ok, :f :write, :value 1, :process 0, :time 2000000, :index 2}
{:process 1 :type :invoke :f :read :value nil}
{:process 1, :type :ok, :f :read, :value 1}]
"""
    events = list(parse_edn(text))
    assert [(e.process, e.type.value, e.f, e.value, e.time, e.line) for e in events] == [
        (0, "invoke", "write", 1, 1e-6, 1),
        (0, "ok", "write", 1, 2e-3, 3),
        (1, "invoke", "read", None, None, 4),
        (1, "ok", "read", 1, None, 5),
    ]
    assert check_history(events, "register").linearizable


@pytest.mark.parametrize(
    "text, message",
    [
        ("{:process 0, :type :invoke\n", r"line 1: not an EDN map"),
        ("{:process 0, :type :invoke, :f :read}\n[1 2]\n", r"line 2: not an EDN map"),
        ("{:process 0, :f :read}\n", r"line 1: the map has no :type"),
        ('{:process "a b", :type :invoke, :f :read}\n', r"line 1: :process must be"),
        ("{:process 0, :type :invoke, :f :read, :time :x}\n", r"line 1: :time must be"),
        ("hello world\nINFO nothing here\n", r"line 1 \('hello world'\) is not a Jepsen EDN map"),
        ("\n\n", r"the file is empty"),
    ],
)
def test_anything_else_is_refused_with_its_line(text, message):
    with pytest.raises(HistoryError, match=message):
        parse_history(text)


def test_fast_edn_reader_agrees_with_edn_format():
    lines = []
    for path in sorted((CONFORMANCE / "kv").glob("*.txt")):
        lines += path.read_text().splitlines()[:300]
    lines += [
        '{:process 3, :type :ok, :f :append, :key "k", :value "a \\"quoted\\" \\\\ \\n x"}',
        "{:process -1 :type :ok :f :cas :value [nil -2] :time 1.5e3}",
        "{:a [1 [2 [3 {:b nil}]]], :c (true false), :d 0.25}",
        "{:process 0, :type :ok, :f :read, :value #{1 2}}",  # a set: edn_format's part
        "{:process 0, :type :ok, :f :read, :value \\c}",
        "{:process 0, :type :ok, :f :read, :value 12N}",
    ]
    for line in lines:
        assert edn.read(line) == edn.plain(edn_format.loads(line)), line


def test_porcupine_kv_log_reads_as_jepsen_edn():
    events = list(read_history(CONFORMANCE / "kv" / "c01-ok.txt"))
    assert events[0] == HistoryEvent(0, EventType.INVOKE, "append", "x 0 0 y", key="0", line=1)
    assert {e.f for e in events} == {"append", "read", "write"}  # get/put read as read/write


# -- the search ---------------------------------------------------------------------


def brute_force(ops: list[Op]) -> tuple[bool, int | None]:
    """Every permutation that respects real time, replayed on the model; also the
    furthest completion any of them reaches (its position), when none gets through."""
    known = [op for op in ops if op.end is not None]
    furthest = -1
    for order in itertools.permutations(range(len(ops))):
        placed = set()
        state = None
        for i in order:
            later = [j for j in range(len(ops)) if j not in placed and j != i]
            if any(ops[j].end is not None and ops[j].end < ops[i].start for j in later):
                break
            legal, state = step(state, ops[i].f, ops[i].value, ops[i].output)
            if not legal:
                break
            placed.add(i)
        ends = [op.end for k, op in enumerate(ops) if op.end is not None and k not in placed]
        if not ends:
            return True, None
        furthest = max(furthest, min(ends))
    assert known
    return False, furthest


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


@pytest.mark.parametrize("reduce_observers", [True, False])
def test_search_agrees_with_brute_force_on_random_small_histories(reduce_observers):
    rng = random.Random(15)
    outcomes = set()
    for _ in range(600):
        ops = random_ops(rng, rng.randint(1, 6))
        expected, furthest = brute_force(ops)
        result = search(ops, reduce_observers=reduce_observers)
        assert result.linearizable is expected, ops
        if not expected:
            # The operation reported stuck completes at the furthest point reached.
            assert ops[result.stuck].end == furthest, ops
        outcomes.add(expected)
    assert outcomes == {True, False}


def test_the_observer_reduction_keeps_verdicts_and_explores_less():
    """On the whole conformance set: the same verdict and the same failing completion
    with and without the reduction, and fewer configurations with it."""
    with_, without = 0, 0
    for name, path, model, _expected in conformance_cases():
        history = read_history(path)
        a = check_history(history, model)
        b = check_history(history, model, reduce_observers=False)
        assert a.linearizable is b.linearizable, name
        if not a.linearizable and a.failing_key == b.failing_key:
            assert a.prefix == b.prefix, name
        with_ += sum(k.states for k in a.keys)
        without += sum(k.states for k in b.keys)
    assert with_ < without * 0.8, (with_, without)


def test_linearization_order_is_returned_and_replays():
    rng = random.Random(3)
    for _ in range(200):
        ops = random_ops(rng, 5)
        result = search(ops)
        orders = [result.order] if result.linearizable else [result.longest]
        for order in orders:
            state = None
            for i in order:
                legal, state = step(state, ops[i].f, ops[i].value, ops[i].output)
                assert legal
        if result.linearizable:
            assert sorted(result.order) == list(range(len(ops)))


def ev(process, kind, f, value=None, key="k", error=None, line=None):
    return HistoryEvent(process, EventType(kind), f, value, key=key, error=error, line=line)


def test_long_histories_cost_memory_for_what_is_concurrent_not_for_their_length():
    """60,000 operations on one register, five clients taking turns: the search holds
    about 250 bytes an operation (configuration, stack frame, interned value), since the
    linearized set is a base and a window of what is still open; a bitset over the whole
    history in each configuration would take 7.5 KB each, 450 MB."""
    events = []
    for i in range(30_000):
        p = i % 5
        events += [ev(p, "invoke", "write", i), ev(p, "ok", "write", i)]
        events += [ev(p, "invoke", "read"), ev(p, "ok", "read", i)]
    verdict = check_history(events, "register")
    assert verdict.linearizable
    assert verdict.keys[0].states == 60_000  # each operation placed once, no backtracking
    assert verdict.peak_memory < 24 * 1024**2
    stale = events + [ev(0, "invoke", "read"), ev(0, "ok", "read", 0)]
    failing = check_history(stale, "register")
    assert not failing.linearizable and len(failing.longest) == 60_000


def test_stale_read_after_acknowledged_write_is_caught():
    history = [
        ev(0, "invoke", "write", 1),
        ev(0, "ok", "write", 1),
        ev(1, "invoke", "read"),
        ev(1, "ok", "read", None),
    ]
    verdict = check_history(history, "register")
    assert not verdict.linearizable and len(verdict.prefix) == 4
    assert [verdict.failing_operations[i].f for i in verdict.longest] == ["write"]
    assert verdict.failing_operations[verdict.stuck].f == "read"


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


def test_an_integer_value_then_an_append_is_an_input_error_not_a_crash(tmp_path):
    history = [
        ev(0, "invoke", "write", 5, line=1),
        ev(0, "ok", "write", 5, line=2),
        ev(1, "invoke", "append", "x", line=3),
        ev(1, "ok", "append", "x", line=4),
    ]
    with pytest.raises(HistoryError, match=r"line 1: key 'k' holds the non-string value 5"):
        check_history(history, "kv")
    path = tmp_path / "int-then-append.edn"
    History(history).write_edn(path)
    out = CliRunner().invoke(command, ["check", str(path)])
    assert out.exit_code == 2 and "appends need string values" in out.output
    assert "Traceback" not in out.output
    strings = [ev(0, "invoke", "write", "5"), ev(0, "ok", "write", "5")] + history[2:]
    strings += [ev(2, "invoke", "read"), ev(2, "ok", "read", "5x")]
    assert check_history(strings, "kv").linearizable


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
        ([ev(0, "invoke", "read", key="a"), ev(0, "ok", "read", key="b")], "on key 'b'"),
    ],
)
def test_malformed_histories_are_refused_by_name(events, message):
    with pytest.raises(HistoryError, match=message):
        pair_operations(events)


def test_model_without_append_refuses_it():
    ops = pair_operations([ev(0, "invoke", "append", "a"), ev(0, "ok", "append", "a")])
    with pytest.raises(HistoryError, match="no :append"):
        check_operations(ops, "register")


# -- budgets --------------------------------------------------------------------------


def exploding_history(writers: int) -> list[HistoryEvent]:
    """`writers` concurrent writes of distinct values, then a read of a value none wrote:
    not linearizable, but a search must try every subset of the writes in every state
    before it can say so (writers x 2^(writers-1) configurations)."""
    events = [ev(i, "invoke", "write", i) for i in range(writers)]
    events += [ev(i, "ok", "write", i) for i in range(writers)]
    return events + [ev(writers, "invoke", "read"), ev(writers, "ok", "read", -1)]


def test_memory_budget_stops_the_search_and_says_how_far_it_got():
    with pytest.raises(MemoryBudgetExceeded) as caught:
        check_history(exploding_history(30), "register", max_memory=8 * 1024**2)
    progress = caught.value.progress
    assert 8 * 1024**2 <= progress.peak_memory < 12 * 1024**2
    (key,) = progress.keys
    assert key.status == "searching" and key.states > 10_000 and key.furthest == 30
    assert "memory budget of 8.0 MiB" in str(caught.value)
    assert "key 'k': 31 operations" in str(caught.value)


def test_time_and_state_budgets_are_undecided_too():
    with pytest.raises(TimeBudgetExceeded):
        check_history(exploding_history(30), "register", time_limit=0.2)
    with pytest.raises(SearchBudgetExceeded, match="more than 5000 configurations of key 'k'"):
        check_history(exploding_history(30), "register", max_states=5000)


def test_progress_is_reported_while_the_search_runs():
    seen = []
    with pytest.raises(TimeBudgetExceeded):
        check_history(exploding_history(30), "register", time_limit=2.5, on_progress=seen.append)
    assert seen and all(p.keys[0].status == "searching" for p in seen)
    assert [p.keys[0].states for p in seen] == sorted(p.keys[0].states for p in seen)


#: The exploding history stops at a 64 MiB budget after about 570,000 configurations, a
#: few CPU seconds on this machine: the stated bound is 40 CPU seconds (the machine is
#: shared, so wall time says more about the other work than about the checker; it is
#: only bounded, at 300 s).
EXPLODE_BUDGET = "64MiB"
EXPLODE_STATED_CPU_S = 40.0
EXPLODE_WALL_LIMIT_S = 300.0


def test_a_history_built_to_explode_stops_at_the_budget_with_exit_3(tmp_path):
    path = tmp_path / "explode.edn"
    History(exploding_history(40)).write_edn(path)
    argv = twlb_argv("sim", "check", str(path), "--model", "register", "--json")
    argv += ["--max-memory", EXPLODE_BUDGET]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = started + EXPLODE_WALL_LIMIT_S
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"still running after {EXPLODE_WALL_LIMIT_S} s")
            time.sleep(0.2)
    finally:
        if proc.returncode is None and not pid:
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 3, stderr
    assert "undecided" in stderr and "memory budget of 64.0 MiB was reached" in stderr
    assert "furthest linearization placed 40" in stderr
    assert usage.ru_utime + usage.ru_stime < EXPLODE_STATED_CPU_S, usage
    # The whole process stays within the budget above what it held before the search
    # (the interpreter, the imports and the history: about 70 MiB).
    report = json.loads(stdout)
    assert report["undecided"] == "the memory budget of 64.0 MiB was reached"
    assert report["process_peak_rss_bytes"] < (64 + 100) * 1024**2, report


# -- the command line -----------------------------------------------------------------


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(command, ["check", str(CONFORMANCE / "kv" / "c01-ok.txt"), "--model", "kv"])
    assert ok.exit_code == 0 and "linearizable" in ok.output
    bad = runner.invoke(
        command,
        ["check", str(CONFORMANCE / "jepsen-etcd" / "etcd_050.log"), "--model", "register"],
    )
    assert bad.exit_code == 1
    assert "NOT linearizable" in bad.output and "no linearization places" in bad.output
    assert "failing prefix: " in bad.output
    junk = tmp_path / "junk.edn"
    junk.write_text("{:process 0, :type :invoke\n")
    out = runner.invoke(command, ["check", str(junk)])
    assert out.exit_code == 2 and "line 1" in out.output
    assert runner.invoke(command, ["check", str(tmp_path / "missing.edn")]).exit_code == 2
    wrong_model = runner.invoke(
        command, ["check", str(CONFORMANCE / "kv" / "c01-ok.txt"), "--model", "register"]
    )
    assert wrong_model.exit_code == 2 and "no :append" in wrong_model.output
    size = runner.invoke(command, ["check", str(junk), "--max-memory", "lots"])
    assert size.exit_code == 2 and "not a size" in size.output


def test_cli_json_names_the_operation_that_cannot_be_placed():
    path = CONFORMANCE / "jepsen-etcd" / "etcd_000.log"
    out = CliRunner().invoke(command, ["check", str(path), "--model", "register", "--json"])
    assert out.exit_code == 1
    report = json.loads(out.output)
    assert report["linearizable"] is False
    verdict = check_history(read_history(path), "register")
    stuck = verdict.failing_operations[verdict.stuck]
    assert report["cannot_place"]["completion_line"] == stuck.end_line == verdict.prefix[-1].line
    assert report["failing_prefix_events"] == len(report["failing_prefix"])
    assert len(report["longest_linearizable_prefix"]) > 0


def test_cli_search_budget_gives_up_with_its_own_exit_code():
    path = str(CONFORMANCE / "jepsen-etcd" / "etcd_002.log")
    result = CliRunner().invoke(
        command, ["check", path, "--model", "register", "--max-states", "1000"]
    )
    assert result.exit_code == 3 and "undecided" in result.output
    assert "more than 1000 configurations" in result.output
    as_json = CliRunner().invoke(
        command, ["check", path, "--model", "register", "--max-states", "1000", "--json"]
    )
    assert as_json.exit_code == 3
    report = json.loads(as_json.stdout)
    assert report["linearizable"] is None
    assert report["undecided"] == "more than 1000 configurations of key (one register) explored"
    (key,) = report["progress"]["keys"]
    assert key["states_explored"] == 1001 and key["status"] == "searching"
    timed = CliRunner().invoke(
        command, ["check", path, "--model", "register", "--time-limit", "0.001"]
    )
    assert timed.exit_code == 3 and "the time limit of 0.001 s was reached" in timed.output


@pytest.mark.parametrize(
    "text, size",
    [
        ("1048576", 1024**2),
        ("512MiB", 512 * 1024**2),
        ("4G", 4 * 1024**3),
        ("1.5GiB", 1536 * 1024**2),
    ],
)
def test_memory_sizes(text, size):
    assert parse_size(text) == size


def test_memory_sizes_refused():
    for text in ("", "12 parsecs", "-1G", "10"):
        with pytest.raises(ValueError):
            parse_size(text)
