"""The checkers can fail: deliberately broken variants of each protocol, run under
random fault schedules (a new fault every 0.15-0.45 s, half of them cutting off the
current leader), are caught within a stated number of seeds, and the correct protocol
passes the very seed that caught its broken twin."""

from __future__ import annotations

import pytest
from sim_cluster import faulty_cluster, violations
from twlb.sim.paxos import MultiPaxos
from twlb.sim.pbft import PBFT
from twlb.sim.raft import Raft

FAULTS_UNTIL = 8.0
END = 10.0


def run(algorithm, name, n, seed, config):
    kernel, ids, _, byzantine = faulty_cluster(
        algorithm, name, n, seed, config, faults_until=FAULTS_UNTIL
    )
    kernel.run(until=END)
    return violations(name, kernel, ids, byzantine=byzantine)


# (algorithm, name, n, broken config, invariant it must break, seeds allowed). Seeds
# 0-99 under this schedule catch double-vote in 55, commit-old-term in 36, no-phase1 in
# 65, and seeds 0-49 catch weak-quorums in 50; the first seeds that catch them are 2,
# 1, 1 and 0.
CASES = [
    (Raft, "raft", 5, {"bug": "double-vote"}, "election-safety", 6),
    (Raft, "raft", 3, {"bug": "commit-old-term"}, "state-machine-safety", 8),
    (MultiPaxos, "paxos", 5, {"bug": "no-phase1"}, "one-value-per-slot", 4),
    (
        PBFT,
        "pbft",
        4,
        {"bug": "weak-quorums", "byzantine": {"node_0": "equivocate"}},
        "agreement",
        3,
    ),
]


@pytest.mark.parametrize(
    ("algorithm", "name", "n", "config", "invariant", "seeds"),
    CASES,
    ids=[case[3]["bug"] for case in CASES],
)
def test_a_broken_variant_is_caught_within_the_stated_seeds(
    algorithm, name, n, config, invariant, seeds
):
    caught = None
    for seed in range(seeds):
        found = run(algorithm, name, n, seed, config)
        if found:
            caught = seed
            break
    assert caught is not None, f"{config['bug']} not caught in {seeds} seeds"
    assert invariant in {v.invariant for v in found}
    correct = {k: v for k, v in config.items() if k != "bug"}
    assert run(algorithm, name, n, caught, correct) == []
