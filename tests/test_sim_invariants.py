"""The protocol invariant checkers on hand-written event histories: each invariant
holds on a good history and is reported, with what broke it, on a bad one."""

from __future__ import annotations

import pytest
from twlb.sim.invariants import Violation, check_invariants, check_progress

from twlb.protocol import ClientRequest, Operation, OpKind


def req(client, seq, value=None):
    return ClientRequest(client, seq, Operation(OpKind.PUT, "k", value or f"{client}{seq}"))


A, B = req("c", 1), req("c", 2)
NODES = ["n1", "n2", "n3"]


def names(found):
    return sorted({v.invariant for v in found})


def raft_history(*extra):
    events = [(0.0, n, ("start", False)) for n in NODES]
    events += [
        (1.0, "n1", ("leader", 1)),
        (1.1, "n1", ("append", 1, 1, A)),
        (1.2, "n2", ("append", 1, 1, A)),
        (1.3, "n1", ("commit", 1, 1, A)),
        (1.3, "n1", ("apply", 1, A)),
        (1.4, "n2", ("commit", 1, 1, A)),
        (1.4, "n2", ("apply", 1, A)),
    ]
    return events + list(extra)


def test_a_good_raft_history_has_no_violation():
    assert check_invariants("raft", raft_history(), nodes=NODES) == []


def test_two_leaders_in_one_term_break_election_safety():
    history = raft_history((1.9, "n3", ("append", 1, 1, A)), (2.0, "n3", ("leader", 1)))
    found = check_invariants("raft", history, nodes=NODES)
    assert names(found) == ["election-safety"] and "n1 and n3 both lead term 1" in found[0].detail


def test_an_entry_of_one_index_and_term_over_different_logs_breaks_log_matching():
    found = check_invariants(
        "raft",
        raft_history(
            (2.0, "n1", ("append", 2, 2, B)),
            (2.0, "n3", ("append", 1, 1, B)),  # n3's index 1 differs from n1's
            (2.1, "n3", ("append", 2, 2, B)),
        ),
    )
    assert "log-matching" in names(found)


def test_a_leader_missing_a_committed_entry_breaks_leader_completeness():
    found = check_invariants("raft", raft_history((2.0, "n3", ("leader", 2))), nodes=NODES)
    assert names(found) == ["leader-completeness"]


def test_two_entries_applied_at_one_index_break_state_machine_safety():
    found = check_invariants(
        "raft",
        raft_history((2.0, "n3", ("append", 1, 2, B)), (2.1, "n3", ("apply", 1, B))),
    )
    assert names(found) == ["state-machine-safety"]


def test_a_restarted_node_re_applies_from_the_start_without_violation():
    history = raft_history((2.0, "n2", ("start", True)), (2.5, "n2", ("apply", 1, A)))
    assert check_invariants("raft", history) == []
    skipping = raft_history((2.0, "n2", ("start", True)), (2.5, "n2", ("apply", 2, B)))
    assert names(check_invariants("raft", skipping)) == ["state-machine-safety"]


def paxos_accepts(slot, ballot, value, nodes):
    return [(1.0, n, ("accepted", slot, ballot, value)) for n in nodes]


def test_paxos_two_majorities_for_different_values_break_one_value_per_slot():
    events = paxos_accepts(1, (1, "n1"), A, ["n1", "n2"]) + paxos_accepts(
        1, (2, "n3"), B, ["n2", "n3"]
    )
    found = check_invariants("paxos", events, nodes=NODES)
    assert names(found) == ["one-value-per-slot"] and "chosen in ballot" in found[0].detail


def test_paxos_learning_a_value_no_majority_accepted_is_reported():
    events = paxos_accepts(1, (1, "n1"), A, ["n1"]) + [(2.0, "n1", ("commit", 1, A))]
    assert names(check_invariants("paxos", events, nodes=NODES)) == ["one-value-per-slot"]


def test_paxos_applying_out_of_order_is_reported():
    events = paxos_accepts(1, (1, "n1"), A, NODES) + paxos_accepts(2, (1, "n1"), B, NODES)
    events += [(2.0, "n1", ("commit", 2, B)), (2.0, "n1", ("apply", 2, B))]
    assert names(check_invariants("paxos", events, nodes=NODES)) == ["applied-in-order"]
    good = paxos_accepts(1, (1, "n1"), A, NODES) + [
        (2.0, "n1", ("commit", 1, A)),
        (2.0, "n1", ("apply", 1, A)),
    ]
    assert check_invariants("paxos", good, nodes=NODES) == []


PBFT_NODES = ["r0", "r1", "r2", "r3"]


def pbft_history(*extra):
    events = [(0.0, n, ("start", False, 0)) for n in PBFT_NODES]
    events += [(0.5, "r1", ("request", "c", 1, A.op)), (0.5, "r1", ("request", "c", 2, B.op))]
    for n in PBFT_NODES:
        events += [
            (1.0, n, ("execute", 1, A, (True, "c1"))),
            (1.1, n, ("execute", 2, B, (True, "c2"))),
        ]
    return events + list(extra)


def test_a_good_pbft_history_has_no_violation():
    assert check_invariants("pbft", pbft_history(), nodes=PBFT_NODES) == []


def test_correct_replicas_executing_different_requests_break_agreement():
    c3 = req("c", 3)
    events = pbft_history(
        (1.5, "r1", ("request", "c", 3, c3.op)), (2.0, "r1", ("execute", 3, c3, (True, "c3")))
    )
    events.append((2.0, "r2", ("execute", 3, None, None)))
    assert names(check_invariants("pbft", events, nodes=PBFT_NODES)) == ["agreement"]
    # The same disagreement from a Byzantine replica is not a violation.
    ok = pbft_history((2.0, "r3", ("execute", 3, B, (True, "x"))))
    assert check_invariants("pbft", ok, nodes=PBFT_NODES, byzantine={"r3"}) == []


def test_an_invented_request_or_a_wrong_answer_breaks_validity():
    invented = pbft_history((2.0, "r1", ("execute", 3, req("z", 1), (True, "z1"))))
    assert names(check_invariants("pbft", invented, nodes=PBFT_NODES)) == ["validity"]
    wrong = [
        (t, n, ("execute", e[1], e[2], (True, "bad")) if n == "r2" and e[0] == "execute" else e)
        for t, n, e in pbft_history()
    ]
    found = check_invariants("pbft", wrong, nodes=PBFT_NODES)
    assert names(found) == ["validity"] and "r2 answered" in found[0].detail
    assert check_invariants("pbft", wrong, nodes=PBFT_NODES, byzantine={"r2"}) == []


def test_progress_needs_a_commit_soon_after_healing_when_clients_ask():
    asked = [(10.0, "n1", ("request", "c", 1, A.op))]
    stalled = check_progress(9.0, asked, within=5.0, end=30.0)
    assert [v.invariant for v in stalled] == ["progress"] and stalled[0].time == 15.0
    done = asked + [(12.0, "n2", ("commit", 1, 1, A))]
    assert check_progress(9.0, done, within=5.0, end=30.0) == []
    no_op_only = asked + [(12.0, "n2", ("commit", 1, 1, None))]
    assert check_progress(9.0, no_op_only, within=5.0, end=30.0) != []
    assert check_progress(9.0, [], within=5.0, end=30.0) == []  # nobody asked
    assert check_progress(9.0, asked, within=5.0, end=12.0) == []  # ran too short to tell


def test_the_runner_context_is_accepted_and_progress_uses_the_stated_bound():
    events = raft_history((20.0, "n1", ("request", "c", 3, A.op)))
    found = check_invariants(
        "raft", events, nodes=NODES, healed_at=19.0, end=60.0, faults=[], byzantine=set()
    )
    assert names(found) == ["progress"] and "5s later" in found[0].detail
    assert check_invariants("raft", events, healed_at=19.0, end=60.0, progress_within=100) == []


def test_a_violation_prints_its_invariant_time_and_detail():
    assert str(Violation("agreement", "r1 and r2 differ", 2.5)) == (
        "agreement at t=2.500s: r1 and r2 differ"
    )


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="gossip"):
        check_invariants("gossip", [])
