"""Each protocol under random fault schedules (partitions, a leader or primary cut off
or crashed and recovered, message loss) keeps every invariant, and after the last heal
commits client operations again within the stated bound (`PROGRESS_WITHIN`)."""

from __future__ import annotations

import pytest
from sim_cluster import acked_ops, faulty_cluster, violations
from twlb.sim.invariants import PROGRESS_WITHIN
from twlb.sim.paxos import MultiPaxos
from twlb.sim.pbft import PBFT
from twlb.sim.raft import Raft

HEAL = 8.0
SEEDS = range(3)


@pytest.mark.parametrize(
    ("algorithm", "name", "n", "config"),
    [
        (Raft, "raft", 5, {}),
        (MultiPaxos, "paxos", 5, {}),
        (PBFT, "pbft", 4, {}),
        (PBFT, "pbft", 4, {"byzantine": {"node_3": "wrong-answer"}}),
    ],
    ids=["raft", "paxos", "pbft", "pbft-wrong-answer"],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_and_progress_resumes_after_faults_heal(algorithm, name, n, config, seed):
    kernel, ids, clients, byzantine = faulty_cluster(
        algorithm, name, n, seed, config, faults_until=HEAL
    )
    kernel.run(until=HEAL)
    acked = acked_ops(clients)
    kernel.run(until=HEAL + PROGRESS_WITHIN[name] + 2.0)
    assert violations(name, kernel, ids, byzantine=byzantine, healed_at=HEAL) == []
    assert acked_ops(clients) > acked
