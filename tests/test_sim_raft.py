"""Raft on the simulator's kernel: elections, replication, leader loss, partitions of a
minority and of the leader, healing, message loss and crash-recover, every run checked
by the invariants."""

from __future__ import annotations

import random

import pytest
from sim_cluster import acked_ops, build, events_of, violations
from twlb.sim.raft import AppendEntries, Raft, RaftConfig, Role

from twlb.protocol import ClientRequest, Effects, Operation, OpKind


def leader_at(kernel, ids):
    leaders = [n for n in ids if n in kernel.nodes and kernel.nodes[n].role is Role.LEADER]
    # With check-quorum a cut-off leader may linger for one election timeout: take the
    # one of the highest term.
    return max(leaders, key=lambda n: kernel.nodes[n].term) if leaders else None


def state_machines(kernel, ids):
    return [kernel.nodes[n].sm.data for n in ids if n in kernel.nodes]


def test_a_leader_is_elected_and_every_node_applies_the_same_operations():
    kernel, ids, clients = build(Raft, 5, seed=1, clients=3)
    kernel.run(until=4.0)
    assert len({e[2][1] for e in events_of(kernel, "leader")}) == 1
    assert acked_ops(clients) > 100
    for client in clients:
        client.stop_at = 4.0
    kernel.run(until=5.0)  # let the last commits reach the followers
    datas = state_machines(kernel, ids)
    assert all(d == datas[0] for d in datas) and datas[0]
    assert violations("raft", kernel, ids, healed_at=0.0) == []


def test_same_seed_gives_the_same_run():
    runs = []
    for _ in range(2):
        kernel, ids, clients = build(Raft, 5, seed=9, net={"latency_ms": (5, 30), "loss": 0.05})
        kernel.run(until=3.0)
        runs.append(kernel.events)
    assert runs[0] == runs[1]


def test_a_follower_redirects_the_client_to_the_leader():
    kernel, ids, _ = build(Raft, 3, seed=2, clients=0)
    kernel.run(until=2.0)
    leader = leader_at(kernel, ids)
    follower = next(n for n in ids if n != leader)
    request = ClientRequest("c9", 1, Operation(OpKind.GET, "k"))
    eff = kernel.nodes[follower].on_request(request, kernel.now)
    (reply,) = eff.replies
    assert not reply.ok and reply.error == "not-leader" and reply.leader_hint == leader


def test_leader_loss_elects_a_new_leader_that_keeps_every_committed_entry():
    kernel, ids, clients = build(Raft, 5, seed=3, clients=3)
    kernel.run(until=2.0)
    old = leader_at(kernel, ids)
    committed_before = kernel.nodes[old].commit_index
    kernel.network.fail_node(old)
    kernel.run(until=3.0)
    new = leader_at(kernel, ids)
    assert new not in (None, old)
    assert kernel.nodes[new].term > 1
    acked = acked_ops(clients)
    kernel.network.recover_node(old)
    kernel.run(until=6.0)
    assert acked_ops(clients) > acked + 50
    assert kernel.nodes[old].commit_index > committed_before  # the old leader caught up
    assert kernel.nodes[old].role is Role.FOLLOWER
    assert violations("raft", kernel, ids, healed_at=3.0) == []


def test_a_partitioned_minority_stays_behind_and_catches_up_after_healing():
    kernel, ids, clients = build(Raft, 5, seed=4, clients=3)
    kernel.run(until=1.0)
    leader = leader_at(kernel, ids)
    minority = [n for n in ids if n != leader][:2]
    kernel.network.create_partition(minority, [n for n in ids if n not in minority])
    kernel.run(until=4.0)
    behind = max(kernel.nodes[n].commit_index for n in minority)
    assert kernel.nodes[leader].commit_index > behind + 50
    assert leader_at(kernel, ids) == leader  # pre-vote: the minority never disrupted it
    assert all(kernel.nodes[n].term == kernel.nodes[leader].term for n in minority)
    kernel.network.heal()
    kernel.run(until=5.0)
    target = kernel.nodes[leader].commit_index
    kernel.run(until=5.5)
    assert all(kernel.nodes[n].commit_index >= target for n in minority)
    assert violations("raft", kernel, ids, healed_at=4.0) == []


def test_a_partitioned_leader_is_replaced_and_its_uncommitted_entries_are_discarded():
    kernel, ids, clients = build(Raft, 5, seed=5, clients=3)
    kernel.run(until=1.0)
    old = leader_at(kernel, ids)
    old_term = kernel.nodes[old].term
    side = [old, next(n for n in ids if n != old)]
    kernel.network.create_partition(side, [n for n in ids if n not in side])
    kernel.run(until=4.0)
    new = leader_at(kernel, ids)
    assert new not in side and kernel.nodes[new].term > old_term
    assert kernel.nodes[old].role is not Role.LEADER  # check-quorum: it stood down
    kernel.network.heal()
    kernel.run(until=6.0)
    logs = [tuple(kernel.nodes[n].log[: kernel.nodes[new].commit_index]) for n in ids]
    assert all(log == logs[0] for log in logs)
    assert events_of(kernel, "truncate", old) or events_of(kernel, "truncate", side[1])
    assert violations("raft", kernel, ids, healed_at=4.0) == []


@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_commits_continue_under_message_loss(loss):
    kernel, ids, clients = build(
        Raft, 5, seed=6, clients=3, net={"latency_ms": (5, 20), "loss": loss}
    )
    kernel.run(until=8.0)
    assert acked_ops(clients) > 50
    assert violations("raft", kernel, ids, healed_at=0.0) == []


def test_crash_recover_restores_term_vote_and_log_and_rebuilds_the_state_machine():
    kernel, ids, clients = build(Raft, 3, seed=7, clients=2)
    kernel.run(until=2.0)
    follower = next(n for n in ids if kernel.nodes[n].role is Role.FOLLOWER)
    before = kernel.nodes[follower]
    term, vote, log = before.term, before.voted_for, list(before.log)
    kernel.network.fail_node(follower)
    kernel.network.recover_node(follower)
    after = kernel.nodes[follower]
    assert after is not before
    assert (after.term, after.voted_for, after.log) == (term, vote, log)
    assert after.commit_index == 0 and after.sm.data == {}
    kernel.run(until=3.0)
    assert after.last_applied >= len(log)  # it re-applied at least what it had stored
    assert after.sm.data
    assert violations("raft", kernel, ids) == []


def test_a_whole_cluster_restart_loses_no_committed_operation():
    kernel, ids, clients = build(Raft, 5, seed=8, clients=3)
    kernel.run(until=2.0)
    acked = [(r, rep) for c in clients for r, rep in c.acked]
    for n in ids:
        kernel.network.fail_node(n)
    kernel.run(until=2.5)
    for n in ids:
        kernel.network.recover_node(n)
    kernel.run(until=5.0)
    leader = leader_at(kernel, ids)
    in_log = {e.request for e in kernel.nodes[leader].log[: kernel.nodes[leader].commit_index]}
    assert all(request in in_log for request, _ in acked)
    assert acked_ops(clients) > len(acked)
    assert violations("raft", kernel, ids, healed_at=2.5) == []


def test_pre_vote_keeps_an_isolated_node_from_raising_its_term():
    for pre_vote, expect_higher in ((True, False), (False, True)):
        kernel, ids, _ = build(Raft, 3, seed=10, config={"pre_vote": pre_vote}, clients=1)
        kernel.run(until=1.0)
        lonely = next(n for n in ids if kernel.nodes[n].role is Role.FOLLOWER)
        term = kernel.nodes[lonely].term
        kernel.network.isolate(lonely)
        kernel.run(until=3.0)
        assert (kernel.nodes[lonely].term > term) is expect_higher


def test_a_stale_append_from_an_old_term_is_refused():
    node = Raft("a", ["b", "c"], random.Random(1), {})
    node.start(0.0)
    node.term = 3
    eff = node.on_message("b", AppendEntries(2, 0, 0, (), 0), 0.1)
    assert eff.send and not eff.send[0][1].success and eff.send[0][1].term == 3
    assert isinstance(eff, Effects) and node.role is Role.FOLLOWER and node.leader is None


@pytest.mark.parametrize(
    "config",
    [{"heartbeat": 0.5}, {"election_timeout": (0.3, 0.1)}, {"bug": "typo"}],
)
def test_bad_configuration_is_refused_with_the_reason(config):
    with pytest.raises(ValueError, match="raft"):
        RaftConfig.from_mapping(config)
