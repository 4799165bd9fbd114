"""The gossip cores on a deterministic in-memory network (tests/gossip_network.py):
the transition table walked, every protocol agreeing on kills and a restart, SWIM's
false-positive rate under heavy loss, partitions healed, binary round-robin's coverage."""

from __future__ import annotations

import math
import random

import pytest
from gossip_network import InMemoryNetwork
from twlb.gossip.heartbeat import HeartbeatConfig, HeartbeatNode, dissemination_rounds
from twlb.gossip.membership import TRANSITIONS, MemberEvent, MemberState, next_state
from twlb.gossip.messages import Ack, Gossip, HeartbeatEntry, HeartbeatTable, Ping, Update
from twlb.gossip.nodes import PROTOCOLS, default_config, describe
from twlb.gossip.swim import SwimConfig, SwimNode

S, E = MemberState, MemberEvent

EXPECTED = {
    S.ALIVE: {
        E.ALIVE_NEWER: S.ALIVE,
        E.SUSPECT: S.SUSPECT,
        E.TIMEOUT: None,
        E.DEAD: S.DEAD,
        E.LEAVE: S.LEFT,
    },
    S.SUSPECT: {
        E.ALIVE_NEWER: S.ALIVE,
        E.SUSPECT: S.SUSPECT,
        E.TIMEOUT: S.DEAD,
        E.DEAD: S.DEAD,
        E.LEAVE: S.LEFT,
    },
    S.DEAD: {
        E.ALIVE_NEWER: S.ALIVE,
        E.SUSPECT: None,
        E.TIMEOUT: None,
        E.DEAD: None,
        E.LEAVE: S.LEFT,
    },
    S.LEFT: {E.ALIVE_NEWER: S.ALIVE, E.SUSPECT: None, E.TIMEOUT: None, E.DEAD: None, E.LEAVE: None},
}


def test_transition_table_is_walked_completely() -> None:
    walked = 0
    for state in S:
        for event in E:
            assert next_state(state, event) is EXPECTED[state][event], (state, event)
            walked += 1
    assert walked == len(S) * len(E)
    assert len(TRANSITIONS) == sum(v is not None for row in EXPECTED.values() for v in row.values())
    # only news of a newer life brings a member back from dead or left
    assert {
        e for (s, e) in TRANSITIONS if s in (S.DEAD, S.LEFT) and TRANSITIONS[(s, e)] is S.ALIVE
    } == {E.ALIVE_NEWER}


def _member_events(effects) -> list[tuple[str, str, int]]:
    return [(e[1], e[2], e[3]) for e in effects.events if e[0] == "member"]


#: Cores driven by hand see no timer between the steps, which a running node would read
#: as a stall of its own and its timers as late (tests/test_gossip_safety.py tests both).
BY_HAND = {"stall_after": math.inf, "late_timer": math.inf}
BEAT_BY_HAND = {"stall_after": math.inf}


def test_swim_core_walks_alive_suspect_dead_rejoined_left() -> None:
    node = SwimNode("a", ["b", "c", "d", "e"], random.Random(1), SwimConfig(**BY_HAND))
    node.start(0.0)
    seen = []

    def feed(update: Update, now: float) -> None:
        seen.extend(_member_events(node.on_message("c", Ping(1, "x", (update,)), now)))

    feed(Update("b", S.SUSPECT, 0, "c"), 1.0)  # alive -> suspect
    feed(Update("b", S.ALIVE, 1, "b"), 2.0)  # refuted: suspect -> alive
    feed(Update("b", S.SUSPECT, 0, "d"), 2.5)  # stale accusation: ignored
    feed(Update("b", S.SUSPECT, 1, "c"), 3.0)  # alive -> suspect again
    # no refutation: the suspicion times out (max timeout with no confirmation)
    seen.extend(_member_events(node.on_timer(3.0 + node.config.suspicion_max(5) + 0.01)))
    feed(Update("b", S.SUSPECT, 1, "d"), 40.0)  # a suspicion of the dead: ignored
    feed(Update("b", S.ALIVE, 1, "b"), 41.0)  # same life: ignored
    feed(Update("b", S.ALIVE, 2, "b"), 42.0)  # rejoined with a higher incarnation
    feed(Update("b", S.LEFT, 2, "b"), 43.0)  # left
    assert seen == [
        ("b", "suspect", 0),
        ("b", "alive", 1),
        ("b", "suspect", 1),
        ("b", "dead", 1),
        ("b", "alive", 2),
        ("b", "left", 2),
    ]


def test_swim_core_refutes_an_accusation_with_a_higher_incarnation() -> None:
    node = SwimNode("a", ["b", "c"], random.Random(1), SwimConfig())
    node.start(0.0)
    effects = node.on_message("b", Ping(1, "a", (Update("a", S.SUSPECT, 0, "b"),)), 1.0)
    assert ("refute", 1) in effects.events
    assert node.incarnation == 1 and node.awareness == 1  # Lifeguard: accused, less sure
    ack = effects.send[0][1]
    # the refutation announces the raised health multiplier with the new incarnation
    assert ack.updates[0] == Update("a", S.ALIVE, 1, "a", health=2)


def test_heartbeat_core_walks_suspect_dead_rejoined_left() -> None:
    cfg = HeartbeatConfig(interval=1.0, fail_mult=1.0, fail_slack=4, **BEAT_BY_HAND)
    node = HeartbeatNode("a", ["b"], random.Random(1), cfg, "round-robin")
    node.start(0.0)
    t_fail = node.fail_after()
    seen = []
    seen += _member_events(
        node.on_message("b", HeartbeatTable("b", 1, (HeartbeatEntry("b", 5, 1),)), 0.5)
    )
    seen += _member_events(node.on_timer(0.5 + t_fail / 2))  # silent: suspect
    seen += _member_events(
        node.on_message("b", HeartbeatTable("b", 2, (HeartbeatEntry("b", 5, 2),)), 3.0)
    )
    seen += _member_events(node.on_timer(3.0 + t_fail / 2))
    seen += _member_events(node.on_timer(3.0 + t_fail))  # still silent: dead
    # a stale copy one beat ahead from a third party does not bring it back
    seen += _member_events(
        node.on_message("c", HeartbeatTable("c", 1, (HeartbeatEntry("b", 5, 3),)), 20.0)
    )
    seen += _member_events(
        node.on_message("b", HeartbeatTable("b", 1, (HeartbeatEntry("b", 6, 1),)), 21.0)
    )
    seen += _member_events(
        node.on_message("b", HeartbeatTable("b", 2, (HeartbeatEntry("b", 6, 2, True),)), 22.0)
    )
    assert [(n, s) for n, s, _ in seen] == [
        ("b", "suspect"),
        ("b", "alive"),
        ("b", "suspect"),
        ("b", "dead"),
        ("b", "alive"),
        ("b", "left"),
    ]


def test_a_peer_cannot_grow_a_table_past_its_bound() -> None:
    cfg = HeartbeatConfig(max_members=10)
    node = HeartbeatNode("a", ["b"], random.Random(1), cfg, "random")
    node.start(0.0)
    flood = tuple(HeartbeatEntry(f"x{i}", 0, 1) for i in range(10_000))
    node.on_message("b", HeartbeatTable("b", 1, flood), 1.0)
    assert len(node.rows) == 10
    swim = SwimNode("a", ["b"], random.Random(1), SwimConfig(max_members=10))
    swim.start(0.0)
    for i in range(100):
        swim.on_message("b", Ping(i, "a", (Update(f"x{i}", S.ALIVE, 0, "b"),)), 1.0)
    assert len(swim.members) == 10


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_member_agrees_on_one_kill_two_kills_and_a_restart(protocol: str) -> None:
    net = InMemoryNetwork(protocol, 12, seed=7, loss=0.01)
    net.run_until(20)
    net.crash("n0003")
    net.run_until(80)
    net.crash("n0005")
    net.crash("n0009")
    net.run_until(140)
    net.restart("n0003")
    net.run_until(200)
    first, second, third = net.watch.failures
    for failure in (first, second, third):
        assert failure.agreed is not None, failure
        assert failure.first_suspect <= failure.first_dead <= failure.agreed
    assert first.readmitted is not None  # the restarted node is alive in every view
    assert not net.watch.false_positives
    assert not net.bad_transitions
    views = net.watch.live_views()
    for observer, view in views.items():
        assert view.get("n0005") in (S.DEAD, S.LEFT) or observer == "n0005"
        assert observer == "n0003" or view["n0003"] is S.ALIVE


def test_swim_has_no_false_positive_at_20_percent_loss_over_an_hour() -> None:
    net = InMemoryNetwork("swim", 16, seed=5, loss=0.2)
    net.run_until(3600)
    suspicions = sum(1 for _, _, e in net.events if e[0] == "member" and e[2] == "suspect")
    refutations = sum(1 for _, _, e in net.events if e[0] == "refute")
    assert suspicions > 1000 and refutations > 100  # the loss did bite: it was refuted
    assert net.watch.false_positives == []
    assert not net.bad_transitions


def test_partitioned_swim_nodes_are_declared_dead_then_refute_on_healing() -> None:
    # healed before the dead are forgotten (tests/test_gossip_safety.py heals after)
    cfg = default_config(
        "swim", reconnect_interval=5.0, push_pull_interval=10.0, gossip_to_the_dead=120.0
    )
    net = InMemoryNetwork("swim", 10, seed=3, config=cfg)
    net.run_until(10)
    minority = {"n0000", "n0001"}
    net.partition(minority, set(net.ids) - minority)
    net.run_until(70)
    for observer, view in net.watch.views.items():
        other = set(net.ids) - minority if observer in minority else minority
        assert all(view[n] is S.DEAD for n in other), observer
    net.heal()
    net.run_until(130)
    assert all(all(s is S.ALIVE for s in v.values()) for v in net.watch.views.values())
    refuted = {src for _, src, e in net.events if e[0] == "refute"}
    assert refuted  # readmitted because they raised their incarnation
    assert not net.bad_transitions


def test_partitioned_heartbeat_node_is_readmitted_on_healing() -> None:
    net = InMemoryNetwork("round-robin", 8, seed=3)
    net.run_until(10)
    net.partition({"n0002"}, set(net.ids) - {"n0002"})
    net.run_until(60)
    assert all(v["n0002"] is S.DEAD for o, v in net.watch.views.items() if o != "n0002")
    net.heal()
    net.run_until(90)
    assert all(all(s is S.ALIVE for s in v.values()) for v in net.watch.views.values())


@pytest.mark.parametrize(
    ("protocol", "n"),
    [
        ("binary-round-robin", 16),
        ("binary-round-robin", 64),
        ("round-robin", 16),
        ("round-robin", 29),
    ],
)
def test_a_round_one_heartbeat_reaches_every_table_within_the_analytic_rounds(
    protocol: str, n: int
) -> None:
    cfg = HeartbeatConfig(interval=1.0)
    net = InMemoryNetwork(protocol, n, seed=1, latency=(0.01, 0.02), config=cfg, stagger=False)
    rounds = dissemination_rounds(protocol, n)
    if protocol == "binary-round-robin":
        assert rounds == math.ceil(math.log2(n))

    def covered() -> bool:
        return all(r.heartbeat >= 1 for node in net.nodes.values() for r in node.rows.values())

    net.run_until(rounds - 1 + 0.5)  # round 1 happens at t = 1
    assert not covered()
    net.run_until(rounds + 0.5)
    assert covered()


def test_sequence_check_counts_the_tables_lost_on_the_way() -> None:
    net = InMemoryNetwork("sequence-check", 8, seed=2, loss=0.1)
    net.run_until(120)
    counted = sum(node.lost_messages for node in net.nodes.values())
    gaps = sum(e[2] for _, _, e in net.events if e[0] == "gap")
    assert counted == gaps
    assert 0 < counted <= net.dropped


def test_describe_lists_members_with_state_and_version() -> None:
    net = InMemoryNetwork("swim", 4, seed=1)
    net.run_until(5)
    answer = describe(net.nodes["n0000"])
    assert answer["protocol"] == "swim" and answer["self"] == "n0000"
    assert {m["node"] for m in answer["members"]} == set(net.ids)
    assert all(m["state"] == "alive" and m["incarnation"] == 0 for m in answer["members"])
    beat = describe(InMemoryNetwork("random", 3, seed=1).nodes["n0000"])
    assert beat["protocol"] == "random"


def test_balancer_verdict_is_dead_only_when_every_answering_member_agrees() -> None:
    from twlb.gossip.verdict import GossipVerdicts

    def answer(me: str, states: dict[str, str]) -> dict:
        return {
            "protocol": "swim",
            "self": me,
            "members": [{"node": n, "state": s} for n, s in states.items()],
        }

    v = GossipVerdicts()
    urls = {"http://a": "a:1", "http://b": "b:1", "http://c": "c:1"}
    v.set_backends(urls)
    for url, me in urls.items():
        v.on_answer(url, answer(me, {"a:1": "alive", "b:1": "alive", "c:1": "alive"}))
    assert v.verdict("http://c")["verdict"] == "alive"
    v.on_answer("http://c", None)  # c died: it no longer answers
    v.on_answer("http://a", answer("a:1", {"a:1": "alive", "b:1": "alive", "c:1": "dead"}))
    assert v.verdict("http://c")["verdict"] == "suspect"  # b has not decided yet
    v.on_answer("http://b", answer("b:1", {"a:1": "alive", "b:1": "alive", "c:1": "dead"}))
    assert v.dead("http://c") and v.verdict("http://c")["down_in"] == 2
    v.on_answer("http://a", answer("a:1", {"a:1": "alive", "c:1": "alive"}))  # readmitted by a
    assert not v.dead("http://c")
    v.on_answer("http://b", {"self": 3, "members": "junk"})  # a malformed answer counts for nothing
    assert v.verdict("http://c")["verdict"] == "alive"
    assert v.verdict("http://nobody")["verdict"] == "unknown"


def test_gossip_sim_command_writes_its_report_and_refuses_bad_input(tmp_path) -> None:
    import json

    from click.testing import CliRunner
    from twlb.sim.gossip_cli import command

    runner = CliRunner()
    args = ["sim", "--protocol", "swim", "--protocol", "binary-round-robin", "--nodes", "6"]
    args += ["--nodes", "8", "--runs", "1", "--fail", "1", "--rejoin", "--out", str(tmp_path)]
    done = runner.invoke(command, args)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "gossip-sim.json").read_text())
    assert {(s["protocol"], s["nodes"]) for s in report["summaries"]} == {
        ("swim", 6),
        ("swim", 8),
        ("binary-round-robin", 6),
        ("binary-round-robin", 8),
    }
    assert all(s["agreed"] == 1 and s["false_positives"] == 0 for s in report["summaries"])
    assert (tmp_path / "gossip-vs-nodes.png").stat().st_size > 0
    assert "analytic_rounds_to_agreement" in (tmp_path / "rounds.md").read_text().splitlines()[0]
    too_big = runner.invoke(
        command, ["sim", "--protocol", "random", "--nodes", "2000", "--out", str(tmp_path)]
    )
    assert too_big.exit_code == 2 and "at most 1024 nodes" in too_big.output
    backwards = runner.invoke(command, ["sim", "--latency", "5", "1", "--out", str(tmp_path)])
    assert backwards.exit_code == 2 and "LOW 5.0 is above HIGH 1.0" in backwards.output


def _swim_cluster(n: int, config: SwimConfig | None = None) -> dict[str, SwimNode]:
    ids = [f"m{i:02d}" for i in range(n)]
    nodes = {
        i: SwimNode(i, [p for p in ids if p != i], random.Random(k), config)
        for k, i in enumerate(ids)
    }
    for node in nodes.values():
        node.start(0.25)
    return nodes


def test_slotted_probes_with_agreeing_views_reach_every_live_member_once_a_slot() -> None:
    nodes = _swim_cluster(9, SwimConfig(**BY_HAND))
    for node in nodes.values():  # m04 is dead in every view
        node.on_message("m01", Ping(1, "x", (Update("m04", S.DEAD, 0, "m01"),)), 0.5)
    live = sorted(n for n in nodes if n != "m04")
    probed: dict[str, list[str]] = {n: [] for n in live}
    for slot in range(1, 1 + 2 * (len(live) - 1)):
        targets = []
        for name in live:
            pings = [m for _, m in nodes[name].on_timer(float(slot)).send if isinstance(m, Ping)]
            assert len(pings) == 1  # one probe per slot, on the slot's boundary
            targets.append(pings[0].target)
            probed[pings[0].target].append(name)
            for other in live:  # every probe is answered: no one is suspected
                if other == pings[0].target:
                    nodes[name].on_message(other, Ack(pings[0].seq), slot + 0.01)
        assert sorted(targets) == live  # a permutation: each live member probed once
    for target, probers in probed.items():
        # n - 1 consecutive slots bring n - 1 different probers, and then again
        assert len(set(probers[: len(live) - 1])) == len(live) - 1, target
        assert target not in probers


def test_a_lone_accuser_waits_the_maximum_and_confirmations_bring_the_minimum() -> None:
    cfg = SwimConfig(**BY_HAND)
    n = 6
    assert cfg.suspicion_min(n) == 2.0 and cfg.suspicion_max(n) == 24.0  # 6 x memberlist's 4 s
    lone = SwimNode("a", ["b", "c", "d", "e", "f"], random.Random(1), cfg)
    lone.start(0.0)
    lone.on_message("c", Ping(1, "x", (Update("b", S.SUSPECT, 0, "c"),)), 1.0)
    assert ("b", "dead", 0) not in _member_events(lone.on_timer(1.0 + 23.9))
    assert ("b", "dead", 0) in _member_events(lone.on_timer(1.0 + 24.01))

    confirmed = SwimNode("a", ["b", "c", "d", "e", "f"], random.Random(1), cfg)
    confirmed.start(0.0)
    for t, accuser in ((1.0, "c"), (1.5, "d"), (2.5, "e")):
        update = Update("b", S.SUSPECT, 0, accuser)
        confirmed.on_message(accuser, Ping(1, "x", (update,)), t)
    assert ("b", "dead", 0) not in _member_events(confirmed.on_timer(2.99))
    assert ("b", "dead", 0) in _member_events(confirmed.on_timer(3.01))  # 1.0 + 2 s


def test_an_accusation_of_a_newer_life_starts_a_new_suspicion() -> None:
    """Accusers of incarnation 1 do not confirm a suspicion of incarnation 0: the accused
    refuted in between (memberlist counts them, a false death verdict at 20% loss)."""
    node = SwimNode("a", ["b", "c", "d", "e", "f"], random.Random(1), SwimConfig())
    node.start(0.0)
    node.on_message("c", Ping(1, "x", (Update("b", S.SUSPECT, 0, "c"),)), 1.0)
    node.on_message("d", Ping(2, "x", (Update("b", S.SUSPECT, 1, "d"),)), 2.0)
    node.on_message("e", Ping(3, "x", (Update("b", S.SUSPECT, 1, "e"),)), 2.5)
    # d and e are one accuser and one confirmation of the new suspicion: not enough
    assert not _member_events(node.on_timer(2.0 + 2.01))
    assert node.members.get("b").incarnation == 1
    node.on_message("f", Ping(4, "x", (Update("b", S.SUSPECT, 1, "f"),)), 5.0)
    assert ("b", "dead", 1) in _member_events(node.on_timer(5.0))


def test_a_probe_of_a_suspect_tells_it_of_the_suspicion() -> None:
    """Lifeguard's buddy system: the accused hears of it from its next prober."""
    node = SwimNode("a", ["b"], random.Random(1), SwimConfig())
    node.start(0.0)
    node.on_message("c", Gossip((Update("b", S.SUSPECT, 3, "c"),)), 0.5)
    ping = next(m for _, m in node.on_timer(1.0).send if isinstance(m, Ping))
    assert ping.target == "b" and ping.updates[0] == Update("b", S.SUSPECT, 3, "a")


def test_piggybacked_facts_go_least_sent_first_and_each_as_often_as_the_limit() -> None:
    node = SwimNode("a", [f"p{i}" for i in range(40)], random.Random(1), SwimConfig())
    node.start(0.0)
    for i in range(40):
        node._enqueue(Update(f"p{i}", S.ALIVE, 1, f"p{i}"))
    limit = node.config.retransmit_limit(len(node.members))
    first = node._piggyback()
    assert [u.node for u in first] == ["a", *(f"p{i}" for i in range(15))]  # oldest first
    sent: dict[str, int] = {u.node: 1 for u in first}
    while batch := node._piggyback():
        assert len(batch) <= node.config.max_piggyback
        for u in batch:
            sent[u.node] = sent.get(u.node, 0) + 1
    assert set(sent.values()) == {limit} and len(sent) == 41  # and our own announcement
