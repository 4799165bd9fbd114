"""Multi-Paxos on the simulator's kernel: a stable leader, gaps filled with no-ops on a
change of leader, leader loss, partitions of a minority and of the leader, healing,
message loss and crash-recover of acceptor state, every run checked by the invariants."""

from __future__ import annotations

import random

import pytest
from sim_cluster import acked_ops, build, events_of, violations
from twlb.sim.paxos import Accept, MultiPaxos, PaxosConfig, Prepare, Promise

from twlb.protocol import ClientRequest, Operation, OpKind


def leader_of(kernel, ids):
    leaders = [n for n in ids if n in kernel.nodes and kernel.nodes[n].leading]
    return max(leaders, key=lambda n: kernel.nodes[n].ballot) if leaders else None


def put(client, seq, value):
    return ClientRequest(client, seq, Operation(OpKind.PUT, "k", value))


def test_one_stable_leader_serves_and_every_node_applies_the_same_slots():
    kernel, ids, clients = build(MultiPaxos, 5, seed=1, clients=3)
    kernel.run(until=4.0)
    leaders = events_of(kernel, "leader")
    assert leaders and all(t < 1.0 for t, _, _ in leaders)  # phase 1 only at the start
    assert acked_ops(clients) > 100
    kernel.run(until=4.5)
    logs = [kernel.nodes[n].log for n in ids]
    longest = max(logs, key=len)
    assert all(log == longest[: len(log)] for log in logs) and min(map(len, logs)) > 100
    assert violations("paxos", kernel, ids, healed_at=0.0) == []


def test_a_new_leader_re_proposes_accepted_values_and_fills_gaps_with_no_ops():
    node = MultiPaxos("a", ["b", "c"], random.Random(1), {})
    node.start(0.0)
    eff = node.on_timer(1.0)  # no leader heard: phase 1
    (prepare,) = {m for _, m in eff.send}
    assert isinstance(prepare, Prepare) and prepare.from_slot == 1
    x = put("c", 1, "x")
    eff = node.on_message("b", Promise(prepare.ballot, ((3, (1, "z"), x),)), 1.01)
    accepts = sorted({(m.slot, m.value) for _, m in eff.send if isinstance(m, Accept)})
    assert accepts == [(1, None), (2, None), (3, x)]
    assert ("leader", prepare.ballot) in eff.events


def test_the_value_of_the_highest_ballot_wins_a_slot():
    node = MultiPaxos("a", ["b", "c", "d", "e"], random.Random(1), {})
    node.start(0.0)
    (prepare,) = {m for _, m in node.on_timer(1.0).send}
    old, new = put("c", 1, "old"), put("c", 2, "new")
    node.on_message("b", Promise(prepare.ballot, ((1, (1, "b"), old),)), 1.01)
    eff = node.on_message("c", Promise(prepare.ballot, ((1, (2, "c"), new),)), 1.02)
    assert {(m.slot, m.value) for _, m in eff.send if isinstance(m, Accept)} == {(1, new)}


def test_leader_loss_elects_a_new_leader_with_one_phase_1():
    kernel, ids, clients = build(MultiPaxos, 5, seed=3, clients=3)
    kernel.run(until=2.0)
    old = leader_of(kernel, ids)
    kernel.network.fail_node(old)
    kernel.run(until=3.0)
    new = leader_of(kernel, ids)
    assert new not in (None, old)
    acked = acked_ops(clients)
    kernel.network.recover_node(old)
    kernel.run(until=6.0)
    assert acked_ops(clients) > acked + 50
    assert kernel.nodes[old].learned >= kernel.nodes[new].learned - 10  # caught up
    assert violations("paxos", kernel, ids, healed_at=3.0) == []


def test_a_partitioned_minority_catches_up_after_healing():
    kernel, ids, clients = build(MultiPaxos, 5, seed=4, clients=3)
    kernel.run(until=1.0)
    leader = leader_of(kernel, ids)
    minority = [n for n in ids if n != leader][:2]
    kernel.network.create_partition(minority, [n for n in ids if n not in minority])
    kernel.run(until=4.0)
    assert kernel.nodes[leader].learned > max(kernel.nodes[n].learned for n in minority) + 50
    kernel.network.heal()
    kernel.run(until=5.0)
    target = kernel.nodes[leader_of(kernel, ids)].learned
    kernel.run(until=5.5)
    assert all(kernel.nodes[n].learned >= target for n in minority)
    assert violations("paxos", kernel, ids, healed_at=4.0) == []


def test_a_partitioned_leader_is_replaced_and_stands_down():
    kernel, ids, clients = build(MultiPaxos, 5, seed=5, clients=3)
    kernel.run(until=1.0)
    old = leader_of(kernel, ids)
    side = [old, next(n for n in ids if n != old)]
    kernel.network.create_partition(side, [n for n in ids if n not in side])
    kernel.run(until=4.0)
    new = leader_of(kernel, ids)
    assert new not in side and not kernel.nodes[old].leading
    acked = acked_ops(clients)
    kernel.network.heal()
    kernel.run(until=6.0)
    assert acked_ops(clients) > acked
    assert violations("paxos", kernel, ids, healed_at=4.0) == []


@pytest.mark.parametrize("loss", [0.1, 0.3])
def test_commits_continue_under_message_loss(loss):
    kernel, ids, clients = build(
        MultiPaxos, 5, seed=6, clients=3, net={"latency_ms": (5, 20), "loss": loss}
    )
    kernel.run(until=8.0)
    assert acked_ops(clients) > 50
    assert violations("paxos", kernel, ids, healed_at=0.0) == []


def test_crash_recover_keeps_the_acceptors_promise_and_votes():
    kernel, ids, clients = build(MultiPaxos, 3, seed=7, clients=2)
    kernel.run(until=2.0)
    follower = next(n for n in ids if not kernel.nodes[n].leading)
    before = kernel.nodes[follower]
    promised, accepted = before.promised, dict(before.accepted)
    kernel.network.fail_node(follower)
    kernel.network.recover_node(follower)
    after = kernel.nodes[follower]
    assert (after.promised, after.accepted) == (promised, accepted)
    assert after.learned == 0 and after.sm.data == {}
    kernel.run(until=3.0)
    assert after.learned >= len(accepted) - 5 and after.sm.data
    assert violations("paxos", kernel, ids) == []


def test_a_whole_cluster_restart_loses_no_chosen_value():
    kernel, ids, clients = build(MultiPaxos, 5, seed=8, clients=3)
    kernel.run(until=2.0)
    acked = [request for c in clients for request, _ in c.acked]
    for n in ids:
        kernel.network.fail_node(n)
    kernel.run(until=2.5)
    for n in ids:
        kernel.network.recover_node(n)
    kernel.run(until=5.0)
    log = set(kernel.nodes[leader_of(kernel, ids)].log)
    assert all(request in log for request in acked)
    assert acked_ops(clients) > len(acked)
    assert violations("paxos", kernel, ids, healed_at=2.5) == []


@pytest.mark.parametrize("config", [{"heartbeat": 0.5}, {"bug": "typo"}])
def test_bad_configuration_is_refused_with_the_reason(config):
    with pytest.raises(ValueError, match="paxos"):
        PaxosConfig.from_mapping(config)
