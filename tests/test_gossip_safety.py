"""Gossip that never kills a slow node, forgets the dead, and runs the paper's consensus
(docs/gossip.md; the argument in docs/DESIGN.md): the health-scaled suspicion windows, memberlist's profile,
forgetting dead and left members under a member cap, joins retried until answered, no
verdict after one's own pause, sequence-check's missed sequence numbers, the suspect
matrix's consensus, the slotted schedule under clock skew, and `twlb gossip sim`'s
false-positive runs. Cores on tests/gossip_network.py's in-memory network or the
simulator's kernel (twlb.sim.gossip), deterministic by seed."""

from __future__ import annotations

import json
import math
import random

import pytest
from click.testing import CliRunner
from gossip_network import InMemoryNetwork
from twlb.gossip.heartbeat import HeartbeatConfig, HeartbeatNode
from twlb.gossip.membership import MemberState
from twlb.gossip.messages import (
    Ack,
    Gossip,
    HeartbeatEntry,
    HeartbeatTable,
    Ping,
    Sync,
    Update,
    Verdict,
)
from twlb.gossip.nodes import PROTOCOLS, default_config, describe
from twlb.gossip.swim import SwimConfig, SwimNode, swim_config
from twlb.gossip.verdict import GossipVerdicts
from twlb.gossip.wire import WireError, decode, encode
from twlb.sim.gossip import Scenario, run_scenario, summarize
from twlb.sim.gossip_cli import command

from twlb.protocol import Effects

S = MemberState
#: driven step by step: no timer runs in between, which a running node would read as a
#: stall of its own (and its timers as late)
BY_HAND = {"stall_after": math.inf, "late_timer": math.inf}
BEAT_BY_HAND = {"stall_after": math.inf}


def _members(effects) -> list[tuple[str, str]]:
    return [(e[1], e[2]) for e in effects.events if e[0] == "member"]


# -- the suspicion rule -----------------------------------------------------------------
def test_a_member_that_announced_itself_slow_gets_longer_to_answer_and_to_refute() -> None:
    cfg = SwimConfig(**BY_HAND)
    n = 6
    assert cfg.suspicion_window(n, 1) == (2.0, 24.0)
    # above 1, never under memberlist's minimum (4 s at N <= 10), and h times ours
    assert cfg.suspicion_window(n, 2) == (4.0, 24.0)
    assert cfg.suspicion_window(n, 8) == (16.0, 24.0)
    node = SwimNode("a", ["b", "c", "d", "e", "f"], random.Random(1), cfg)
    node.start(0.0)
    node.on_message("b", Gossip((Update("b", S.ALIVE, 1, "b", health=4),)), 0.5)
    assert node.members.get("b").health == 4 and node.members.get("b").incarnation == 1
    # three healthy accusers: the confirmed minimum is memberlist's floor x 4 / 2 = 8 s
    for t, accuser in ((1.0, "c"), (1.2, "d"), (1.4, "e")):
        node.on_message(accuser, Ping(1, "x", (Update("b", S.SUSPECT, 1, accuser),)), t)
    assert ("b", "dead") not in _members(node.on_timer(8.9))
    assert ("b", "dead") in _members(node.on_timer(9.01))


def test_a_probe_of_a_slow_member_waits_its_multiplier_before_accusing() -> None:
    node = SwimNode("a", ["b"], random.Random(1), SwimConfig(**BY_HAND))
    node.start(0.0)
    node.on_message("b", Gossip((Update("b", S.ALIVE, 1, "b", health=3),)), 0.5)
    ping = next(m for _, m in node.on_timer(1.0).send if isinstance(m, Ping))
    # a healthy target would be accused at 2.0; this one answers at 3.5, in time
    assert not _members(node.on_timer(2.5))
    node.on_message("b", Ack(ping.seq, (Update("b", S.ALIVE, 1, "b", health=3),)), 3.5)
    assert node.members.get("b").state is S.ALIVE and node.awareness == 0


def test_only_healthy_direct_probers_confirm_a_suspicion() -> None:
    cfg = SwimConfig(**BY_HAND)
    node = SwimNode("a", ["b", "c", "d", "e", "f"], random.Random(1), cfg)
    node.start(0.0)
    node.on_message("c", Ping(1, "x", (Update("b", S.SUSPECT, 0, "c"),)), 1.0)
    # an accuser whose own multiplier was 4 when it probed, and a full-state sync that
    # repeats the suspicion: neither is a confirmation
    node.on_message("d", Ping(2, "x", (Update("b", S.SUSPECT, 0, "d", health=4),)), 1.1)
    node.on_message("e", Sync((Update("b", S.SUSPECT, 0, "e"),), reply=False), 1.2)
    assert node._suspicions["b"].confirmers == {"c"}
    assert ("b", "dead") not in _members(node.on_timer(3.5))
    node.on_message("f", Ping(3, "x", (Update("b", S.SUSPECT, 0, "f"),)), 3.6)
    node.on_message("d", Ping(4, "x", (Update("b", S.SUSPECT, 0, "d", health=1),)), 3.7)
    assert ("b", "dead") in _members(node.on_timer(3.8))  # 1.0 + 2 s, two confirmed


def test_a_slow_node_announces_its_health_as_soon_as_its_own_probes_fail() -> None:
    """A node that reads every message 1-2 s late (the issue's slow node) fails its first
    probe (the acks come after its deadline, no helper's nack in time) and announces its
    multiplier under a new incarnation at once; the others then hold it at that health,
    and nobody declares it dead."""
    net = InMemoryNetwork("swim", 10, seed=1, slow=1, slow_delay=(1.0, 2.0))
    net.run_until(120)
    (slow,) = net.slow
    announced = [(t, e[1]) for t, src, e in net.events if src == slow and e[0] == "health"]
    assert announced and announced[0][0] <= 2.5 and announced[0][1] >= 3
    held = [n.members.get(slow).health for i, n in net.nodes.items() if i != slow]
    assert min(held) >= 2
    assert net.watch.false_positives == [] and not net.bad_transitions


def test_timers_handled_late_count_against_ones_own_health() -> None:
    """An overloaded process is late with its timers as well as its reading: its own
    probes can then look answered in time, so the lateness itself raises its multiplier
    (announced at once), as a failed probe would."""
    node = SwimNode("a", ["b", "c"], random.Random(1), SwimConfig(join_seeds=0))
    wake = node.start(0.0).wake_at
    while wake < 1.4:  # every timer on time; the first probe answered at once
        effects = node.on_timer(wake)
        for dst, m in effects.send:
            if isinstance(m, Ping):
                effects = node.on_message(dst, Ack(m.seq), wake + 0.001)
        assert node.awareness == 0 and not [e for e in effects.events if e[0] == "health"]
        wake = effects.wake_at
    late = node.on_timer(wake + 0.7)  # the next timer, handled 0.7 s late
    assert node.awareness == 1 and ("health", 2, 1) in late.events
    assert node.announced_health() == 2 and node.incarnation == 1


def test_memberlist_profile_sets_memberlists_values() -> None:
    ml = swim_config("memberlist")
    assert (ml.probe_interval, ml.probe_timeout, ml.indirect_checks) == (1.0, 0.5, 3)
    assert (ml.suspicion_mult, ml.suspicion_max_timeout_mult, ml.retransmit_mult) == (4, 6, 4)
    assert (ml.gossip_interval, ml.gossip_nodes, ml.gossip_to_the_dead) == (0.2, 3, 30.0)
    assert ml.awareness_max_multiplier == 8 and ml.push_pull_interval == 30.0
    assert ml.probe_schedule == "shuffled" and not ml.health_windows
    assert ml.gossip_transmits is None
    assert ml.suspicion_window(10, 8) == (4.0, 24.0)  # memberlist's minimum, health or not
    assert ml.suspicion_confirmations == 2
    ml6 = swim_config("memberlist", suspicion_mult=6)
    assert (ml6.suspicion_min_mult, ml6.suspicion_confirmations) == (6.0, 4)
    assert default_config("swim", "memberlist") == ml
    with pytest.raises(ValueError, match="profile"):
        default_config("swim", "consul")


def test_the_spec_and_the_backend_flags_carry_the_profile() -> None:
    from twlb.gossip.nodes import config_from_spec

    from twlb.spec import GossipSpec

    spec = GossipSpec(profile="memberlist", interval_s=0.2, forget_after_s=5.0)
    cfg = config_from_spec(spec)
    assert cfg.profile == "memberlist" and cfg.probe_schedule == "shuffled"
    assert cfg.probe_interval == 0.2 and cfg.gossip_to_the_dead == 5.0
    assert "--gossip-profile" in spec.to_args() and "memberlist" in spec.to_args()
    assert config_from_spec(GossipSpec()).health_windows
    beat = config_from_spec(GossipSpec(protocol="consensus", interval_s=0.1))
    assert beat.reap_after == pytest.approx(6.0)


# -- the false-positive table, shortened; the full one is bench/gossip_bench.py ---
@pytest.mark.parametrize("profile", ["twlb", "memberlist"])
def test_gossip_sim_counts_no_false_verdict_about_slow_nodes(profile: str, tmp_path) -> None:
    args = ["sim", "--nodes", "10", "--slow-nodes", "0.1", "--slow-lag", "1", "2", "--no-fail"]
    args += ["--loss", "0.05", "--loss", "0.2", "--duration", "300", "--runs", "2"]
    args += ["--gossip-profile", profile, "--out", str(tmp_path)]
    done = CliRunner().invoke(command, args)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "gossip-sim.json").read_text())
    for row in report["summaries"]:
        assert row["failures"] == 0 and row["false_positives"] == 0, row
        assert row["slow_lag_s"] == [1.0, 2.0] and row["profile"] == profile
    assert all(len(r["scenario"]["slow"]) == 1 for r in report["runs"])


def test_the_shortened_rule_without_health_windows_convicts_the_slow_node() -> None:
    """The issue's first row, one seed: the shortened window alone (this project's
    settings before the health windows) declares the 1-2 s slow node dead."""
    base = {"nodes": 10, "loss": 0.05, "fail": 0, "slow_fraction": 0.1, "duration": 300.0}
    bare = Scenario("swim", slow_lag_s=(1.0, 2.0), overrides=(("health_windows", False),), **base)
    assert run_scenario(bare).false_positives > 0
    assert run_scenario(Scenario("swim", slow_lag_s=(1.0, 2.0), **base)).false_positives == 0


def test_gossip_sim_refuses_a_backwards_slow_lag(tmp_path) -> None:
    done = CliRunner().invoke(command, ["sim", "--slow-lag", "2", "1", "--out", str(tmp_path)])
    assert done.exit_code == 2 and "LOW 2.0 is above HIGH 1.0" in done.output
    both = CliRunner().invoke(command, ["sim", "--fail", "2", "--no-fail", "--out", str(tmp_path)])
    assert both.exit_code == 2 and "--no-fail" in both.output


# -- message load -------------------------------------------------------------------------
def test_a_fact_goes_out_in_gossip_messages_only_for_its_first_transmissions() -> None:
    node = SwimNode("a", [f"p{i}" for i in range(40)], random.Random(1), SwimConfig(**BY_HAND))
    node.start(0.0)
    node._piggyback()  # our own announcement: sent once
    fact = Update("p1", S.SUSPECT, 0, "p2")
    node._enqueue(fact)
    in_gossip = 0
    t = 0.0
    while t < 0.9:  # before the first probe (at 1.0) can carry it
        t += 0.1
        in_gossip += sum(
            1 for _, m in node.on_timer(t).send if isinstance(m, Gossip) and fact in m.updates
        )
    assert in_gossip == node.config.gossip_transmits  # two gossip intervals to three members
    assert node._gossip_armed is False and "p1" in node._broadcasts  # the rest on probes
    carried = 0
    while "p1" in node._broadcasts and t < 60:
        t += 0.1
        carried += sum(1 for _, m in node.on_timer(t).send if fact in getattr(m, "updates", ()))
    total = in_gossip + carried
    assert total == node.config.retransmit_limit(len(node.members))  # and no more


# -- forgetting -------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["swim", "round-robin", "consensus"])
def test_a_member_cap_of_8_admits_each_of_20_newcomers_that_join_and_leave(protocol) -> None:
    """Three founders with room for 8 members; 20 newcomers join one after another, stay a
    while and leave. Every one is admitted by every founder, no view ever holds more than
    8, and the founders forget the ones that left (the living are never pushed out)."""
    overrides = {"max_members": 8}
    overrides["gossip_to_the_dead" if protocol == "swim" else "reap_after"] = 10.0
    cfg = default_config(protocol, **overrides)
    net = InMemoryNetwork(protocol, 3, seed=4, config=cfg)
    founders = list(net.ids)
    net.run_until(5)
    for i in range(20):
        newcomer = f"x{i:03d}"
        net.add_node(newcomer, founders)
        net.run_until(net.now + 3)
        for f in founders:
            member = dict((n, s) for n, s, _ in net.nodes[f].view())
            assert member.get(newcomer) is S.ALIVE, (i, f, member)
            assert len(member) <= 8
        net.leave(newcomer)
        net.run_until(net.now + 1 + (6 if i % 2 else 0))  # some leave before others are forgotten
    net.run_until(net.now + 15)
    for f in founders:
        view = {n: s for n, s, _ in net.nodes[f].view()}
        assert set(view) == set(founders), view  # the departed forgotten, the founders kept
        assert all(s is S.ALIVE for s in view.values())
        forgotten = {n: s for n, s, _ in net.nodes[f].forgotten()}
        assert forgotten and set(forgotten.values()) == {S.LEFT}
    assert not net.bad_transitions


def test_a_forgotten_member_stays_down_for_readers_and_stale_hearsay_cannot_revive_it() -> None:
    cfg = SwimConfig(gossip_to_the_dead=5.0, **BY_HAND)
    node = SwimNode("a", ["b", "c"], random.Random(1), cfg)
    node.start(0.0)
    node.on_message("c", Gossip((Update("b", S.DEAD, 0, "c"),)), 0.5)
    effects = node.on_timer(6.0)
    assert ("forgot", "b") in effects.events and node.members.get("b") is None
    rows = {m["node"]: m for m in describe(node)["members"]}
    assert rows["b"] == {"node": "b", "state": "dead", "incarnation": 0, "forgotten": True}
    verdicts = GossipVerdicts()
    verdicts.set_backends(["http://a", "http://b", "http://c"])
    verdicts.on_answer("http://b", None)
    verdicts.on_answer("http://a", describe(node))
    verdicts.ids["http://b"] = "b"
    assert verdicts.dead("http://b")  # the balancer still reads it dead
    node.on_message("c", Gossip((Update("b", S.ALIVE, 0, "c"),)), 6.5)  # hearsay, old life
    assert node.members.get("b") is None
    node.on_message("b", Gossip((Update("b", S.ALIVE, 0, "b"),)), 7.0)  # its own word
    assert node.members.get("b").state is S.ALIVE and not node.members.tombstones


def test_partitioned_swim_nodes_forgotten_on_both_sides_find_each_other_again() -> None:
    cfg = default_config("swim", reconnect_interval=5.0, gossip_to_the_dead=10.0)
    net = InMemoryNetwork("swim", 10, seed=3, config=cfg)
    net.run_until(10)
    minority = {"n0000", "n0001"}
    net.partition(minority, set(net.ids) - minority)
    net.run_until(100)
    assert all(len(net.nodes[n].members) == 2 for n in minority)  # each side forgot the other
    assert all(len(net.nodes[n].members) == 8 for n in set(net.ids) - minority)
    net.heal()
    net.run_until(160)  # Serf's reconnect tries the tombstones of the failed
    for node in net.nodes.values():
        assert {n for n, s, _ in node.view() if s is S.ALIVE} == set(net.ids)
    assert not net.bad_transitions


# -- joins ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["swim", "round-robin"])
def test_a_lost_join_is_retried_with_back_off_until_answered(protocol: str) -> None:
    net = InMemoryNetwork(protocol, 6, seed=2, config=default_config(protocol))
    net.run_until(10)
    asked: list[float] = []

    def cut_off_until_the_fourth_join(src: str, dst: str, message) -> bool:
        """Everything the restarted node sends is lost until it asks the fourth time."""
        if src != "n0002":
            return False
        join = (isinstance(message, Sync) and message.reply) or (
            isinstance(message, HeartbeatTable) and message.join
        )
        if join:
            asked.append(net.now)
        return len({round(t, 3) for t in asked}) <= 3

    net.drop = cut_off_until_the_fourth_join
    net.crash("n0002")
    net.run_until(30)
    net.restart("n0002")
    net.run_until(40)
    tries = sorted({round(t - 30.0, 3) for t in asked})
    assert tries[:4] == [0.0, 0.5, 1.5, 3.5]  # 0.5 s, then twice as long each time
    assert len(tries) == 4  # answered at the fourth: no more
    (failure,) = net.watch.failures
    assert failure.readmitted is not None and failure.readmitted - 30.0 < 5.0


# -- one's own pause ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_node_resumed_after_a_10_s_pause_convicts_no_peer(protocol: str) -> None:
    for seed in range(1, 6):
        net = InMemoryNetwork(protocol, 5, seed=seed, loss=0.01)
        net.run_until(20)
        net.pause("n0002", 10.0)
        net.run_until(60)
        mine = [e for t, src, e in net.events if src == "n0002" and e[0] == "member"]
        assert "stall" in {e[0] for t, src, e in net.events if src == "n0002"}, seed
        assert not [e for e in mine if e[2] == "dead"], (seed, mine)
        assert not net.bad_transitions


# -- sequence-check and consensus --------------------------------------------------------
def _runs(protocol: str, n: int, seeds: range, **kw):
    return [run_scenario(Scenario(protocol, n, loss=0.01, fail=1, seed=s, **kw)) for s in seeds]


@pytest.mark.parametrize("n", [10, 32])
def test_sequence_check_detects_before_round_robin_on_the_same_runs(n: int) -> None:
    rr, sc = _runs("round-robin", n, range(1, 6)), _runs("sequence-check", n, range(1, 6))
    for a, b in zip(rr, sc, strict=True):
        assert b.failures[0]["node"] == a.failures[0]["node"]  # the same kill
        fa, fb = a.failures[0], b.failures[0]
        assert fb["first_detection_s"] < fa["first_detection_s"] - 2.0, (fa, fb)
        # before T_fail: the missed sequence number and half of T_fail's silence decide
        assert fb["first_detection_s"] < b.fail_after_s
        assert fb["agreement_s"] is not None and b.false_positives == 0


def test_consensus_is_reached_by_every_live_node_and_declared_by_none_alone() -> None:
    rows = []
    for runs in (_runs("consensus", 12, range(1, 6)), _runs("consensus", 24, range(1, 3))):
        rows.append(summarize(runs))
        for run in runs:
            for f in run.failures:
                assert f["agreement_s"] is not None, f  # every live node holds it dead
                # every live member suspected it before the first declared it dead
                assert f["all_suspect_s"] <= f["first_detection_s"], f
            assert run.false_positives == 0
    assert all(r["declared_before_all_suspected"] == 0 for r in rows)
    rr = summarize(_runs("round-robin", 12, range(1, 6)))
    assert rows[0]["agreement_p99_s"] < rr["agreement_p99_s"]  # and sooner than T_fail's


def test_consensus_merges_the_suspect_matrix_row_by_row_and_waits_for_everyone() -> None:
    cfg = HeartbeatConfig(interval=1.0, join_seeds=0, **BEAT_BY_HAND)
    node = HeartbeatNode("a", ["b", "c", "d"], random.Random(1), cfg, "consensus")
    node.start(0.0)

    def table(sender: str, beat: int, suspects: tuple[str, ...], t: float):
        rows = (HeartbeatEntry(sender, 1, beat, False, suspects),)
        return _members(node.on_message(sender, HeartbeatTable(sender, beat, rows), t))

    for beat in (1, 2):
        table("b", beat, (), beat)
        table("c", beat, (), beat)
    node.rows["d"].state = S.SUSPECT  # d fell silent
    table("b", 3, ("d",), 3.0)
    assert node.rows["d"].state is S.SUSPECT  # c does not suspect d yet
    table("c", 2, ("d",), 3.1)  # an older row of c's: not merged
    assert node.rows["c"].suspects == frozenset()
    effects = node.on_message(
        "c", HeartbeatTable("c", 3, (HeartbeatEntry("c", 1, 3, False, ("d",)),)), 3.2
    )
    assert ("d", "dead") in _members(effects)
    sent = [(dst, m) for dst, m in effects.send if isinstance(m, Verdict)]
    assert {dst for dst, _ in sent} == {"b", "c"} and sent[0][1].node == "d"


def test_with_nobody_left_to_agree_consensus_waits_for_t_fail() -> None:
    """Two survivors of a cluster of four: each one's suspicion of the other is all the
    consensus there is, so it takes T_fail's silence, as round robin's verdict does (a
    tick of the scheduler must not make a lone survivor condemn the other)."""
    cfg = HeartbeatConfig(interval=1.0, join_seeds=0, **BEAT_BY_HAND)
    node = HeartbeatNode("a", ["b", "c", "d"], random.Random(1), cfg, "consensus")
    node.start(0.0)
    for other in ("c", "d"):
        node.rows[other].state = S.DEAD
    node.on_message("b", HeartbeatTable("b", 1, (HeartbeatEntry("b", 1, 1),)), 1.0)
    t_fail = node.fail_after()
    node.rows["b"].state = S.SUSPECT  # silent since 1.0
    node._seek_consensus(1.0 + t_fail - 0.1, Effects())
    assert node.rows["b"].state is S.SUSPECT
    effects = Effects()
    node._seek_consensus(1.0 + t_fail, effects)
    assert node.rows["b"].state is S.DEAD and ("declared", "b", (1, 1)) in effects.events


def test_a_verdict_is_accepted_unless_the_receiver_holds_newer_life() -> None:
    cfg = HeartbeatConfig(interval=1.0, join_seeds=0, **BEAT_BY_HAND)
    node = HeartbeatNode("a", ["b", "c"], random.Random(1), cfg, "consensus")
    node.start(0.0)
    node.on_message("b", HeartbeatTable("b", 5, (HeartbeatEntry("b", 1, 5),)), 0.5)
    assert not _members(node.on_message("c", Verdict("c", "b", 1, 4), 0.6))  # we heard 5
    assert ("b", "dead") in _members(node.on_message("c", Verdict("c", "b", 1, 5), 0.7))


# -- clock skew -----------------------------------------------------------------------------
@pytest.mark.parametrize(("skew", "drift"), [(0.05, 1e-4), (0.3, 1e-3)])
def test_the_slotted_schedule_under_clock_skew_detects_and_never_hangs(skew, drift) -> None:
    """Nodes whose clocks are off by up to `skew` s either way and run fast or slow by up
    to `drift` (the simulator's set_clock_skew): probes start on each node's own slot
    boundaries, so with a skew near a third of a slot two members may probe one target in
    the same slot and another none. The run ends (bounded events, no hang), the kill is
    agreed by every live member within memberlist's bound, and no live node is convicted."""
    for protocol in ("swim", "consensus"):
        results = [
            run_scenario(
                Scenario(
                    protocol, 16, loss=0.01, fail=1, seed=s, clock_skew_s=skew, clock_drift=drift
                )
            )
            for s in (1, 2, 3)
        ]
        for r in results:
            assert r.events < 2_000_000 and r.sim_s > 0
            assert r.failures[0]["agreement_s"] is not None
            assert r.false_positives == 0
        if protocol == "swim":
            bound = SwimConfig().memberlist_suspicion_timeout(16) + 1.0
            assert summarize(results)["agreement_p99_s"] < bound


# -- the wire ---------------------------------------------------------------------------
def test_new_fields_travel_on_the_wire_and_bad_ones_are_refused_by_name() -> None:
    for message in (
        Ping(1, "b", (Update("b", S.ALIVE, 3, "b", health=4),)),
        HeartbeatTable("a", 7, (HeartbeatEntry("a", 1, 7, False, ("b", "c")),), join=True),
        Verdict("a", "b", 1, 9),
    ):
        assert decode(encode(message)) == message
    assert b"health" not in encode(Ping(1, "b", (Update("b", S.ALIVE, 3, "b"),)))
    with pytest.raises(WireError, match="health"):
        decode(b'{"t":"gsp","u":[["b","a",1,"b",0]]}')
    with pytest.raises(WireError, match="suspects"):
        decode(b'{"t":"hb","s":"a","r":1,"e":[["a",1,1,0,["x","y"]]]}', max_entries=1)
    with pytest.raises(WireError, match="'j'"):
        decode(b'{"t":"hb","s":"a","r":1,"e":[],"j":1}')
    with pytest.raises(WireError, match="node"):
        decode(b'{"t":"vd","s":"a","n":"","g":1,"h":1}')
