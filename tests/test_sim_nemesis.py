"""The nemesis that aims: faults at the leader, partitions around it, a cut in the instant
after it appends, a crash in the instant after a vote, bridge and ring partitions,
clock faults; every episode repairs what it broke, crashes stay within what the
protocol tolerates, and a crash loses what was not persisted."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from click.testing import CliRunner
from twlb.sim.cli import command
from twlb.sim.nemesis import Arena, bridge_halves, ring_cuts, start_episode
from twlb.sim.raft import Raft
from twlb.sim.runner import Fault, SimConfig, Simulation
from twlb.sim.sweep import SweepSettings, nemesis_of

from twlb.protocol import quorum


def raft_sim(faults, nodes=5, seed=1, **protocol) -> Simulation:
    return Simulation(
        SimConfig(
            algorithm="raft",
            nodes=nodes,
            seed=seed,
            duration=12.0,
            faults=faults,
            progress_within=4.0,
            protocol=protocol,
        )
    )


def down_at_once(log) -> int:
    down, most = set(), 0
    for _t, action, detail in log:
        if action == "crash":
            down.add(detail)
        elif action == "recover":
            down.discard(detail)
        most = max(most, len(down))
    return most


def test_the_arena_names_the_leader_of_the_highest_term() -> None:
    sim = raft_sim([])
    sim.run_until(3.0)
    leaders = [n for n, node in sim.kernel.nodes.items() if node.leadership() is not None]
    assert sim.arena.leader() == max(leaders, key=lambda n: sim.kernel.nodes[n].term)


def test_leader_crash_strikes_the_leader_of_the_moment_and_recovers_it() -> None:
    sim = raft_sim([Fault(1.0, "leader-crash", (7.0, 3))])
    crashes = []
    original = sim.network.fail_node

    def fail_node(node, **kw):
        crashes.append((node, sim.arena.leader()))
        original(node, **kw)

    sim.network.fail_node = fail_node  # type: ignore[method-assign]
    report = sim.finish()
    assert len(crashes) >= 3
    assert all(node == leader for node, leader in crashes)
    assert not sim.network.down and report["passed"]
    assert all(1.0 <= t <= 7.0 for t, a, _d in sim.network.log if a in ("crash", "recover"))


def test_isolate_after_append_cuts_the_leader_in_the_instant_it_appends() -> None:
    sim = raft_sim([Fault(1.0, "isolate-after-append", (6.0, 5))])
    report = sim.finish()
    cuts = [(t, d) for t, a, d in sim.network.log if a == "partition"]
    assert cuts, "no leader appended in the episode"
    appends = {(t, n) for t, n, e in sim.kernel.events if e[0] == "append" and e[3] is not None}
    for t, (side, _rest) in cuts:
        struck = [n for n in side if (t, n) in appends]
        assert struck, f"the cut at {t} did not follow an append by a node of {side}"
        assert len(side) <= 5 - quorum(5)  # the leader's side is a minority
    assert report["passed"]


def test_a_cut_after_an_append_keeps_the_entry_from_the_others() -> None:
    sim = raft_sim([Fault(1.0, "isolate-after-append", (6.0, 5))], nodes=3)
    sim.run_until(6.0)
    t, (side, rest) = next((t, d) for t, a, d in sim.network.log if a == "partition")
    index = next(
        e[1] for at, n, e in sim.kernel.events if at == t and n == side[0] and e[0] == "append"
    )
    # No node of the other side appended that entry (term and index) while the cut held.
    term = next(e[2] for at, n, e in sim.kernel.events if at == t and e[0] == "append")
    heal = next(at for at, a, _d in sim.network.log if a == "heal" and at > t)
    assert not [
        n
        for at, n, e in sim.kernel.events
        if t <= at < heal and n in rest and e[0] == "append" and e[1:3] == (index, term)
    ]


def test_vote_crash_crashes_a_voter_in_the_instant_after_its_vote_and_it_keeps_the_vote() -> None:
    sim = raft_sim([Fault(1.0, "vote-crash", (8.0, 2))])
    votes = {}
    recovered_votes = []

    def watch(node_id, events):
        for e in events:
            if e[0] == "vote":
                votes[node_id] = (e[1], e[2])
            if e[0] == "start" and e[1] and node_id in votes:
                node = sim.kernel.nodes[node_id]
                recovered_votes.append((node.term, node.voted_for) == votes[node_id])

    sim.kernel.watchers.insert(0, watch)
    report = sim.finish()
    crashes = [(t, d) for t, a, d in sim.network.log if a == "crash"]
    vote_times = {(t, n) for t, n, e in sim.kernel.events if e[0] == "vote"}
    assert crashes and all(c in vote_times for c in crashes)
    assert recovered_votes and all(recovered_votes)  # persisted: the vote survives
    assert report["passed"]


def test_a_crash_loses_what_was_not_persisted() -> None:
    sim = raft_sim([], nodes=3)
    sim.run_until(3.0)
    follower = next(n for n, node in sim.kernel.nodes.items() if node.leadership() is None)
    before = sim.kernel.nodes[follower]
    assert before.commit_index > 0 and before.sm.data
    sim.network.fail_node(follower)
    sim.network.recover_node(follower)
    after = sim.kernel.nodes[follower]
    assert (after.term, after.voted_for, after.log) == (before.term, before.voted_for, before.log)
    assert after.commit_index == 0 and after.sm.data == {}  # volatile: rebuilt from the log
    forgetful = raft_sim([], nodes=3, bug="forget-vote")
    forgetful.run_until(3.0)
    voter = next(n for n, node in forgetful.kernel.nodes.items() if node.voted_for is not None)
    forgetful.network.fail_node(voter)
    forgetful.network.recover_node(voter)
    assert forgetful.kernel.nodes[voter].voted_for is None


def test_crashes_never_exceed_what_the_protocol_tolerates() -> None:
    settings = SweepSettings(
        nodes=5,
        duration=14.0,
        progress_within=4.0,
        nemeses=("crash", "leader-crash", "vote-crash"),
        mix=True,
        episodes=6,
    )
    for seed in range(6):
        config, _ = settings.config(seed)
        sim = Simulation(config)
        sim.finish()
        assert down_at_once(sim.network.log) <= 2, seed


def test_every_episode_repairs_what_it_broke_by_its_end() -> None:
    for name in ("leader-isolate", "leader-minority", "leader-majority", "clock", "leader-pause"):
        sim = raft_sim([Fault(1.0, name, (5.0, 7))])
        sim.run_until(5.0 + 1e-6)
        assert not sim.network.partitions and not sim.network.down, name
        assert not sim.network.skew, name
        assert any(t >= 1.0 for t, _a, _d in sim.network.log), name


def test_partitions_around_the_leader_put_it_on_the_side_named() -> None:
    for name, minority in (("leader-minority", True), ("leader-majority", False)):
        sim = raft_sim([Fault(1.0, name, (5.0, 11))])
        leaders = []
        original = sim.network.create_partition

        def create_partition(a, b, leaders=leaders, original=original, sim=sim):
            leaders.append((set(a), sim.arena.leader()))
            original(a, b)

        sim.network.create_partition = create_partition  # type: ignore[method-assign]
        sim.run_until(5.0)
        assert leaders
        for side, leader in leaders:
            assert leader in side
            assert (len(side) < quorum(5)) is minority


def test_bridge_and_ring_partitions_have_their_shapes() -> None:
    nodes = [f"node_{i}" for i in range(5)]
    for seed in range(20):
        a, b = bridge_halves(random.Random(seed), nodes)
        bridge = set(nodes) - set(a) - set(b)
        assert len(bridge) == 1 and a and b and not set(a) & set(b)
        cuts = set(ring_cuts(random.Random(seed), nodes))
        seen = {n: frozenset(m for m in nodes if tuple(sorted((n, m))) not in cuts) for n in nodes}
        assert all(len(v) == quorum(5) and n in v for n, v in seen.items())
        assert len(set(seen.values())) == 5  # no two nodes see the same majority
    assert ring_cuts(random.Random(0), nodes[:3]) == ()  # three nodes: all see each other


def test_an_aiming_schedule_replays_exactly() -> None:
    faults = [Fault(1.0, "isolate-after-append", (5.0, 9)), Fault(2.0, "clock", (6.0, 4))]
    logs = [raft_sim(list(faults)).finish()["faults"] for _ in range(2)]
    assert logs[0] == logs[1] and len(logs[0]) > 4


def test_seeds_are_spread_across_the_nemeses_named() -> None:
    named = ("leader-crash", "bridge", "clock", "byzantine")
    assert [nemesis_of(named, s, False) for s in range(4)] == [
        ("leader-crash",),
        ("bridge",),
        ("clock",),
        ("leader-crash",),
    ]
    assert nemesis_of(named, 7, True) == ("leader-crash", "bridge", "clock")
    settings = SweepSettings(nemeses=named[:3], episodes=5)
    kinds = Counter(f.action for s in range(9) for f in settings.config(s)[0].faults)
    assert kinds["leader-crash"] and kinds["clock"] and kinds["partition"]


def test_an_unknown_episode_or_nemesis_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown fault action 'leader-explode'"):
        Fault(1.0, "leader-explode", (2.0, 1))
    arena = Arena(raft_sim([]).kernel, ["node_0"], 0)
    with pytest.raises(ValueError, match="expected \\[until, seed\\]"):
        start_episode(arena, "leader-crash", 1.0, (2.0,))
    with pytest.raises(ValueError, match="expected \\[UNTIL, SEED\\]"):
        Fault(3.0, "leader-crash", (2.0, 1))
    bad_row = CliRunner().invoke(command, ["--faults", '[[1,"leader-crash",[5]]]'])
    assert bad_row.exit_code == 2 and "expected [UNTIL, SEED]" in bad_row.output
    result = CliRunner().invoke(command, ["sweep", "--nemesis", "leader-explode", "--runs", "1"])
    assert result.exit_code == 2 and "unknown nemesis leader-explode" in result.output


def test_the_cli_replays_an_aiming_schedule_from_its_json(tmp_path) -> None:
    faults = json.dumps([Fault(1.0, "leader-crash", (5.0, 3)).as_json()])
    out = tmp_path / "run.json"
    args = ["--nodes", "5", "--duration", "12", "--progress-within", "4", "--seed", "2"]
    result = CliRunner().invoke(command, [*args, "--faults", faults, "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [a for _t, a, _d in report["faults"]].count("crash") >= 2
    assert Fault.from_json(report["config"]["faults"][0]) == Fault(1.0, "leader-crash", (5.0, 3))


def test_raft_nodes_report_their_leadership() -> None:
    node = Raft("a", ["b", "c"], random.Random(0), {})
    assert node.leadership() is None
