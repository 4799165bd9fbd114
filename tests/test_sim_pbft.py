"""PBFT on the simulator's kernel: the three phases, client quorums of f+1 replies,
authenticated messages, checkpoints and state transfer, view changes forced by a silent
or equivocating primary, f Byzantine replicas of each kind, message loss, partitions
and crash-recover, every run checked by the invariants (agreement and validity)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from sim_cluster import acked_ops, build, events_of, violations
from twlb.sim.pbft import (
    PBFT,
    Keyring,
    NewView,
    PBFTConfig,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    ReplyQuorum,
    ViewChange,
    request_digest,
)

from twlb.protocol import ClientReply, ClientRequest, Operation, OpKind


def pbft_cluster(n=4, seed=1, byzantine=None, clients=3, net=None, **config):
    if byzantine:
        config["byzantine"] = byzantine
    options = {"quorum": lambda: ReplyQuorum(n), "broadcast_on_retry": True}
    return build(PBFT, n, seed, config=config, clients=clients, net=net, client_options=options)


def check(kernel, ids, byzantine=(), **context):
    return violations("pbft", kernel, ids, byzantine=set(byzantine), **context)


def correct_states(kernel, ids, byzantine=()):
    return {n: kernel.nodes[n].sm.data for n in ids if n not in byzantine}


def test_every_replica_executes_the_same_requests_in_the_same_order():
    kernel, ids, clients = pbft_cluster()
    kernel.run(until=4.0)
    assert acked_ops(clients) > 100
    kernel.run(until=4.5)
    executed = {n: [e[2][1:3] for e in events_of(kernel, "execute", n)] for n in ids}
    shortest = min(map(len, executed.values()))
    assert shortest > 100 and all(
        v[:shortest] == executed[ids[0]][:shortest] for v in executed.values()
    )
    assert check(kernel, ids, healed_at=0.0) == []


def test_a_client_takes_a_result_only_when_f_plus_1_replicas_agree():
    quorum = ReplyQuorum(4)  # f = 1: two matching replies
    right = ClientReply("c", 1, True, "v")
    assert quorum.add(ClientReply("c", 1, True, ("wrong", "v")), "node_1") is None
    assert quorum.add(right, "node_2") is None
    assert quorum.add(right, "node_2") is None  # the same replica twice counts once
    assert quorum.add(right, "node_3") == right


def test_a_byzantine_behaviour_is_named_per_replica_or_by_a_mapping():
    assert PBFTConfig.from_mapping("node_1", {"byzantine": "silent"}).byzantine == "silent"
    shared = {"byzantine": {"node_1": "equivocate"}}
    assert PBFTConfig.from_mapping("node_1", shared).byzantine == "equivocate"
    assert PBFTConfig.from_mapping("node_2", shared).byzantine is None


def test_a_forged_or_altered_message_is_rejected():
    kernel, ids, _ = pbft_cluster(clients=0)
    kernel.run(until=0.5)
    target = kernel.nodes["node_2"]
    keys = Keyring("twlb-sim", ids)
    honest = keys.authenticate("node_1", Prepare(0, 1, "d", "node_1"))
    altered = dataclasses.replace(honest, body=Prepare(0, 1, "other", "node_1"))
    impostor = Keyring("another-seed", ids).authenticate("node_1", Prepare(0, 1, "d", "node_1"))
    for src, message in [("node_1", altered), ("node_1", impostor), ("node_3", honest)]:
        eff = target.on_message(src, message, 0.5)
        assert [e[0] for e in eff.events] == ["rejected"] and not eff.send
    assert target.rejected == 3 and not target.slots
    target.on_message("node_1", honest, 0.5)
    assert target.slots[(0, 1)].prepares["node_1"] == honest  # the genuine one is taken


def test_a_silent_primary_is_replaced_by_a_view_change():
    byzantine = {"node_0": "silent"}
    kernel, ids, clients = pbft_cluster(byzantine=byzantine)
    kernel.run(until=6.0)
    views = events_of(kernel, "view")
    assert {n for _, n, e in views if e[1] == 1} >= {"node_1", "node_2", "node_3"}
    assert acked_ops(clients) > 100
    assert check(kernel, ids, byzantine, healed_at=0.0) == []


@pytest.mark.parametrize(
    ("n", "byzantine"),
    [(4, {"node_0": "equivocate"}), (7, {"node_0": "equivocate", "node_3": "equivocate"})],
)
def test_f_equivocating_replicas_cannot_split_the_correct_ones(n, byzantine):
    kernel, ids, clients = pbft_cluster(n=n, byzantine=byzantine)
    kernel.run(until=8.0)
    assert acked_ops(clients) > 50
    assert check(kernel, ids, byzantine, healed_at=0.0) == []


def test_wrong_answers_of_f_replicas_never_reach_a_client():
    byzantine = {"node_1": "wrong-answer"}
    kernel, ids, clients = pbft_cluster(byzantine=byzantine)
    kernel.run(until=4.0)
    replies = [reply for c in clients for _, reply in c.acked]
    assert len(replies) > 100
    assert not any(isinstance(r.value, tuple) and r.value[:1] == ("wrong",) for r in replies)
    assert check(kernel, ids, byzantine) == []


def test_checkpoints_become_stable_and_collect_the_garbage_below_them():
    kernel, ids, clients = pbft_cluster(checkpoint_interval=8, window=16)
    kernel.run(until=3.0)
    for n in ids:
        node = kernel.nodes[n]
        assert node.stable_seq >= 64
        assert all(seq > node.stable_seq for _, seq in node.slots)
        assert len(node.slots) <= 16 and all(s >= node.stable_seq for s in node.snapshots)
    assert check(kernel, ids) == []


def test_a_replica_cut_off_catches_up_by_state_transfer():
    kernel, ids, clients = pbft_cluster(checkpoint_interval=8, window=16)
    kernel.run(until=1.0)
    kernel.network.isolate("node_3")
    kernel.run(until=3.0)
    behind = kernel.nodes["node_3"].last_executed
    assert kernel.nodes["node_1"].last_executed > behind + 32
    kernel.network.heal()
    kernel.run(until=5.0)
    assert events_of(kernel, "state-transfer", "node_3")
    assert kernel.nodes["node_3"].last_executed >= kernel.nodes["node_1"].last_executed - 16
    assert check(kernel, ids, healed_at=3.0) == []


def test_a_partitioned_primary_is_replaced_and_rejoins_the_new_view():
    kernel, ids, clients = pbft_cluster()
    kernel.run(until=1.0)
    kernel.network.isolate("node_0")
    kernel.run(until=4.0)
    assert all(kernel.nodes[n].view >= 1 for n in ids[1:])
    acked = acked_ops(clients)
    kernel.network.heal()
    kernel.run(until=8.0)
    assert acked_ops(clients) > acked + 50
    view = kernel.nodes["node_1"].view
    assert kernel.nodes["node_0"].view == view and not kernel.nodes["node_0"].in_view_change
    assert check(kernel, ids, healed_at=4.0) == []


@pytest.mark.parametrize("loss", [0.05, 0.2])
def test_requests_execute_under_message_loss(loss):
    kernel, ids, clients = pbft_cluster(net={"latency_ms": (5, 20), "loss": loss})
    kernel.run(until=8.0)
    assert acked_ops(clients) > 30
    assert check(kernel, ids, healed_at=0.0) == []


def test_crash_recover_of_a_backup_keeps_its_log_and_state():
    kernel, ids, clients = pbft_cluster()
    kernel.run(until=2.0)
    before = kernel.nodes["node_2"]
    executed, data = before.last_executed, dict(before.sm.data)
    kernel.network.fail_node("node_2")
    kernel.network.recover_node("node_2")
    after = kernel.nodes["node_2"]
    assert after is not before and after.last_executed == executed and after.sm.data == data
    kernel.run(until=4.0)
    assert after.last_executed > executed + 20
    assert check(kernel, ids, healed_at=2.0) == []


@pytest.mark.parametrize(
    "config",
    [{"byzantine": {"node_1": "lazy"}}, {"bug": "typo"}, {"window": 8}, {"tick": 0}],
)
def test_bad_configuration_is_refused_with_the_reason(config):
    with pytest.raises(ValueError, match="pbft"):
        PBFTConfig.from_mapping("node_1", config)


def test_more_byzantine_replicas_than_f_is_reported():
    kernel, ids, _ = pbft_cluster(clients=0, byzantine={"node_1": "silent", "node_2": "silent"})
    kernel.run(until=0.5)
    found = check(kernel, ids, {"node_1", "node_2"})
    assert [v.invariant for v in found] == ["fault-bound"]


def view_change_setup():
    ids = [f"node_{i}" for i in range(4)]
    keys = Keyring("twlb-sim", ids)
    replicas = {n: PBFT(n, [p for p in ids if p != n], random.Random(1), {}) for n in ids}
    x = ClientRequest("c", 1, Operation(OpKind.PUT, "k", "x"))
    pp = keys.authenticate("node_0", PrePrepare(0, 2, request_digest(x), x))
    prepares = tuple(
        keys.authenticate(n, Prepare(0, 2, request_digest(x), n)) for n in ("node_1", "node_2")
    )
    certificate = PreparedCertificate(pp, prepares)
    vcs = [
        keys.authenticate("node_1", ViewChange(1, 0, (), (certificate,), "node_1")),
        keys.authenticate("node_2", ViewChange(1, 0, (), (), "node_2")),
        keys.authenticate("node_3", ViewChange(1, 0, (), (), "node_3")),
    ]
    return keys, replicas, x, certificate, vcs


def test_a_new_view_re_proposes_prepared_requests_and_fills_gaps_with_null_requests():
    keys, replicas, x, _, vcs = view_change_setup()
    _, pre_prepares, _ = replicas["node_1"]._new_view_pre_prepares(vcs)
    assert pre_prepares == [
        PrePrepare(1, 1, "null", None),
        PrePrepare(1, 2, request_digest(x), x),
    ]
    signed = tuple(keys.authenticate("node_1", pp) for pp in pre_prepares)
    new_view = keys.authenticate("node_1", NewView(1, tuple(vcs), signed))
    backup = replicas["node_2"]
    eff = backup.on_message("node_1", new_view, 5.0)
    assert backup.view == 1 and not backup.in_view_change and ("view", 1) in eff.events
    sent = {(m.body.seq, m.body.digest) for _, m in eff.send if isinstance(m.body, Prepare)}
    assert sent == {(1, "null"), (2, request_digest(x))}


def test_a_new_view_that_drops_a_prepared_request_is_rejected():
    keys, replicas, _, _, vcs = view_change_setup()
    dropped = (
        keys.authenticate("node_1", PrePrepare(1, 1, "null", None)),
        keys.authenticate("node_1", PrePrepare(1, 2, "null", None)),
    )
    new_view = keys.authenticate("node_1", NewView(1, tuple(vcs), dropped))
    backup = replicas["node_3"]
    eff = backup.on_message("node_1", new_view, 5.0)
    assert backup.view == 0 and eff.events[0][0] == "rejected"


def test_a_view_change_with_a_forged_prepare_in_its_certificate_is_not_counted():
    keys, replicas, x, certificate, _ = view_change_setup()
    forged_prepare = Keyring("not-the-seed", list(replicas)).authenticate(
        "node_3", Prepare(0, 2, request_digest(x), "node_3")
    )
    forged = PreparedCertificate(certificate.pre_prepare, (certificate.prepares[0], forged_prepare))
    vc = keys.authenticate("node_2", ViewChange(1, 0, (), (forged,), "node_2"))
    assert not replicas["node_1"]._valid_view_change(vc, 1)
    honest = keys.authenticate("node_2", ViewChange(1, 0, (), (certificate,), "node_2"))
    assert replicas["node_1"]._valid_view_change(honest, 1)
