"""The replicated hash table: versions, strict and sloppy quorums, hinted hand-off that
survives its coordinator, Merkle-tree anti-entropy, read repair, join and leave, and the
three schedules under which an earlier version of it lost acknowledged writes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.sim.checker import check_history
from twlb.sim.dht import (
    DhtConfig,
    LocalDht,
    QuorumError,
    Record,
    create_dht,
    descends,
    merge_clocks,
    rank,
    reconcile,
    resolve,
)
from twlb.sim.history import EventType, History, HistoryEvent
from twlb.sim.merkle import MerkleTree, differing_leaves, leaf_of

KEYS = [f"key{i}" for i in range(120)]


def _fill(dht: LocalDht, keys: list[str], seed: int = 0) -> dict[str, str]:
    """Write every key through a random live node; the acknowledged ones."""
    rng = random.Random(seed)
    names = sorted(dht.kernel.spawned)
    written = {}
    for k in keys:
        coordinator = dht[rng.choice([n for n in names if n not in dht.down])]
        try:
            coordinator.put(k, f"{k}=v{seed}")
        except QuorumError:
            continue  # not acknowledged: nothing is promised about it
        written[k] = f"{k}=v{seed}"
    return written


def _placed_as_the_ring_says(dht: LocalDht, keys: list[str]) -> None:
    """Every key is held by exactly its N homes on the current ring."""
    some = next(iter(dht.nodes.values()))
    for k in keys:
        assert dht.holders(k) == set(some.preference(k)), k


def _key_with_homes(dht: LocalDht, want: set[str], avoid: set[str] = frozenset()) -> str:
    some = next(iter(dht.nodes.values()))
    return next(
        k for k in KEYS if want <= set(some.preference(k)) and not avoid & set(some.preference(k))
    )


# ---- versions -------------------------------------------------------------------------


clocks = st.dictionaries(st.sampled_from("abcd"), st.integers(1, 5), max_size=4).map(
    lambda d: tuple(sorted(d.items()))
)


@given(a=clocks, b=clocks)
def test_the_stated_merge_orders_every_write_after_those_it_descends_from(a, b) -> None:
    merged = merge_clocks([a, b])
    assert descends(merged, a) and descends(merged, b)
    if descends(a, b) and a != b:
        assert rank(a) > rank(b)
    if a != b:
        assert rank(a) != rank(b)  # a total order: one of two concurrent writes wins


def test_concurrent_writes_are_kept_as_siblings_until_one_supersedes_them() -> None:
    base = Record("k", 1, (("a", 1),))
    left = Record("k", 2, (("a", 1), ("b", 1)))
    right = Record("k", 3, (("a", 1), ("c", 1)))
    siblings = reconcile([base], [left], [right])
    assert {r.value for r in siblings} == {2, 3}  # base is superseded by both
    assert resolve(siblings).value == 3  # the higher rank: ("c", 1) > ("b", 1)
    later = Record("k", 4, merge_clocks([left.clock, right.clock, (("b", 2),)]))
    assert reconcile(siblings, [later]) == (later,)


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="write_quorum"):
        create_dht(3, replication_factor=2, write_quorum=3)
    with pytest.raises(ValueError, match="read_quorum"):
        DhtConfig(replication_factor=3, read_quorum=0)
    with pytest.raises(ValueError, match="strict mode needs"):
        DhtConfig(replication_factor=3, write_quorum=1, read_quorum=2)
    with pytest.raises(ValueError, match="mode"):
        DhtConfig(mode="eventual")
    with pytest.raises(ValueError, match="distinct"):
        create_dht(["a", "a"])
    with pytest.raises(ValueError, match="unknown dht bug"):
        DhtConfig(bug="nonsense")


# ---- the founding API and the strict promise -----------------------------------------------


def test_the_founding_api_puts_gets_and_deletes() -> None:
    dht = create_dht(["a", "b", "c", "d"], replication_factor=2)
    dht_node = dht["a"]
    assert dht_node.put("key1", "value1") == "value1"
    assert dht_node.get("key1") == "value1"
    assert dht["d"].get("key1") == "value1"  # any node coordinates
    answer = dht["b"].read("key1")
    assert answer.value == "value1" and answer.siblings == 1 and answer.clock
    dht["c"].delete("key1")
    assert dht_node.get("key1") is None
    assert len(dht.holders("key1")) == 0
    with pytest.raises(KeyError, match="zz"):
        dht["zz"]


def test_a_strict_operation_without_a_quorum_of_homes_fails_and_says_why() -> None:
    dht = create_dht(6, replication_factor=3, seed=6)
    key = _key_with_homes(dht, set())
    homes = dht["node-0"].node.preference(key)
    dht.stop(homes[0])
    dht.stop(homes[1])
    coordinator = next(n for n in sorted(dht.nodes) if n not in homes)
    with pytest.raises(QuorumError, match="1 of 2 replicas answered"):
        dht[coordinator].put(key, "v")  # refused: nothing was stored
    with pytest.raises(QuorumError, match="1 of 2 replicas answered"):
        dht[coordinator].get(key)


def test_a_write_short_of_w_acknowledgements_says_it_may_still_take_effect() -> None:
    dht = create_dht(3, replication_factor=3, write_quorum=3, read_quorum=1, seed=6)
    dht.stop("node-2")
    with pytest.raises(QuorumError, match="2 of 3 replicas acknowledged; the write may"):
        dht["node-0"].put("key1", "value1")
    dht.start("node-2")
    # It did reach two homes: a later read may find it, and then every read finds it.
    assert dht["node-1"].get("key1") == "value1"
    assert dht["node-2"].get("key1") == "value1"


def _random_schedule_history(seed: int, **config) -> History:
    """40 random steps through random coordinators: put, get and delete of 4 keys, and
    partitions, heals, crashes (at most N-1 = 2 nodes down) and recoveries between them.
    The history of what the clients saw, an undecided write recorded as unknown."""
    rng = random.Random(seed)
    dht = create_dht(6, replication_factor=3, seed=seed, **config)
    names = sorted(dht.kernel.spawned)
    history = History()
    for i in range(40):
        kind = rng.choice(["put", "get", "delete", "cut", "heal", "crash", "recover"])
        key, node = f"k{rng.randrange(4)}", rng.choice(names)
        if kind == "cut":
            dht.kernel.network.heal()
            cut = rng.sample(names, rng.randint(1, 5))
            dht.kernel.network.create_partition(cut, [n for n in names if n not in cut])
            continue
        if kind == "heal":
            dht.kernel.network.heal()
            continue
        if kind == "crash":
            if node not in dht.down and len(dht.down) < 2:
                dht.stop(node)
            continue
        if kind == "recover":
            for down in sorted(dht.down):
                dht.start(down)
            continue
        if node in dht.down:
            continue
        f = "read" if kind == "get" else "write"
        value = f"v{i}" if kind == "put" else None
        history.append(HistoryEvent(i, EventType.INVOKE, f, value, key=key, time=dht.now))
        try:
            if kind == "get":
                value = dht[node].get(key)
            elif kind == "put":
                dht[node].put(key, value)
            else:
                dht[node].delete(key)
            done = EventType.OK
        except QuorumError as err:
            done = EventType.INFO if "may still take effect" in str(err) else EventType.FAIL
        history.append(HistoryEvent(i, done, f, value, key=key, time=dht.now))
    return history


@pytest.mark.parametrize("quorums", [(2, 2), (3, 1), (1, 3)])
def test_strict_quorums_keep_every_key_linearizable_under_partitions_and_crashes(quorums):
    w, rq = quorums
    for seed in range(40):
        history = _random_schedule_history(seed, write_quorum=w, read_quorum=rq)
        assert check_history(history, "kv").linearizable, (seed, history.to_edn())


def test_the_same_schedules_find_stale_reads_with_sloppy_single_replica_quorums() -> None:
    """The control: the same 40 schedules with sloppy W = Rq = 1 give histories that
    are not linearizable (the test above can fail)."""
    caught = [
        seed
        for seed in range(40)
        if not check_history(
            _random_schedule_history(seed, mode="sloppy", write_quorum=1, read_quorum=1), "kv"
        ).linearizable
    ]
    assert len(caught) >= 5, caught


# ---- the three schedules of the earlier version's lost writes -----------------------------


def _crash_the_coordinator_right_after_a_write_with_a_home_down(mode: str):
    """R=3 on six nodes: one home down during a write; its coordinator (not a home)
    crashes within 0.5 s of the acknowledgement, before its timeout could make a hinted
    copy; the home comes back."""
    dht = create_dht(6, replication_factor=3, seed=11, mode=mode)
    key = _key_with_homes(dht, set(), avoid={"node-0"})
    homes = dht["node-1"].node.preference(key)
    dht.stop(homes[2])
    dht["node-0"].put(key, "acknowledged")
    dht.stop("node-0")  # at the acknowledgement: its pending write, in memory, is gone
    assert not any(key in b for n in dht.nodes.values() for b in n.hints.values())
    dht.start(homes[2])
    return dht, key, homes


@pytest.mark.parametrize("mode", ["strict", "sloppy"])
def test_schedule_1_the_home_that_missed_a_write_gets_it_though_no_hint_was_made(mode) -> None:
    dht, key, homes = _crash_the_coordinator_right_after_a_write_with_a_home_down(mode)
    dht.run_for(8.0)  # anti-entropy rounds every second
    assert dht.nodes[homes[2]].value(key) == "acknowledged"
    assert any(e[0] == "anti-entropy" for _t, n, e in dht.events if n == homes[2])
    dht.stop(homes[0])
    dht.stop(homes[1])  # N-1 homes down: the write is on the third
    reader = next(n for n in sorted(dht.nodes) if n not in homes)
    if mode == "sloppy":
        assert dht[reader].get(key) == "acknowledged"
    else:  # strict: one home is not a read quorum; the read fails, it never answers empty
        with pytest.raises(QuorumError, match="quorum not reached"):
            dht[reader].get(key)
        dht.start(homes[0])
        assert dht[reader].get(key) == "acknowledged"


def test_schedule_1_without_anti_entropy_the_home_stays_without_the_write() -> None:
    """The control: the broken variant with no Merkle-tree repair never gives the home
    its copy (what the earlier version did)."""
    dht = create_dht(6, replication_factor=3, seed=11, bug="no-anti-entropy")
    key = _key_with_homes(dht, set(), avoid={"node-0"})
    homes = dht["node-1"].node.preference(key)
    dht.stop(homes[2])
    dht["node-0"].put(key, "acknowledged")
    dht.stop("node-0")
    dht.start(homes[2])
    dht.run_for(8.0)
    assert dht.nodes[homes[2]].value(key) is None


def test_a_hint_survives_its_coordinator_and_its_stand_ins_crash() -> None:
    dht = create_dht(6, replication_factor=3, seed=3)
    key = _key_with_homes(dht, set(), avoid={"node-0"})
    homes = dht["node-1"].node.preference(key)
    dht.stop(homes[2])
    dht["node-0"].put(key, "while-down")
    dht.run_for(1.5)  # the coordinator's timeout: the silent home's copy goes to a stand-in
    stand_ins = [n for n, node in dht.nodes.items() if key in node.hints.get(homes[2], {})]
    assert len(stand_ins) == 1 and stand_ins[0] not in homes
    dht.stop("node-0")  # the coordinator
    if stand_ins[0] != "node-0":
        dht.stop(stand_ins[0])  # and the stand-in: the hint is on its disk
    dht.start(stand_ins[0])
    assert key in dht.nodes[stand_ins[0]].hints[homes[2]]
    dht.start(homes[2])
    dht.run_for(2.0)
    assert dht.nodes[homes[2]].value(key) == "while-down"
    assert not dht.nodes[stand_ins[0]].hints
    assert any(e[0] == "handoff-in" for _, n, e in dht.events if n == homes[2])


def _stand_in_schedule(mode: str, bug: str | None = None) -> tuple[LocalDht, str, str]:
    """Every node up; a partition {coordinator, one home, stand-ins} | {two homes,
    reader}: the coordinator suspects the two homes, then writes."""
    dht = create_dht(6, replication_factor=3, seed=5, mode=mode, bug=bug)
    key = "key7"
    homes = dht["node-0"].node.preference(key)
    others = [n for n in sorted(dht.nodes) if n not in homes]
    writer, reader = others[0], others[1]
    dht["node-0"].put(key, "old")
    dht.run_for(1.0)
    near = [writer, homes[0], others[2]]
    dht.kernel.network.create_partition(near, [n for n in dht.nodes if n not in near])
    try:
        dht[writer].put(key, "new")
        acknowledged = True
    except QuorumError:
        acknowledged = False
    return dht, reader, "new" if acknowledged else "old"


def test_schedule_2_strict_quorums_do_not_count_stand_ins_so_no_read_is_stale() -> None:
    dht, reader, last_acknowledged = _stand_in_schedule("strict")
    assert last_acknowledged == "old"  # one home reachable: the write was not acknowledged
    assert dht[reader].get("key7") == "old"


@pytest.mark.parametrize(("mode", "bug"), [("sloppy", None), ("strict", "stand-in-acks")])
def test_schedule_2_with_stand_ins_counted_a_read_misses_the_acknowledged_write(mode, bug) -> None:
    """The control: counting a stand-in's acknowledgement (sloppy mode, its stated weaker
    promise; or the broken strict variant) acknowledges the write on one home and a
    stand-in, and a read of the two other homes returns the older value."""
    dht, reader, last_acknowledged = _stand_in_schedule(mode, bug)
    assert last_acknowledged == "new"
    assert dht[reader].get("key7") == "old"


@pytest.mark.parametrize("mode", ["strict", "sloppy"])
def test_schedule_3_a_coordinator_whose_clock_is_behind_still_writes_the_newer_version(
    mode,
) -> None:
    dht = create_dht(6, replication_factor=3, seed=9, mode=mode)
    dht.kernel.network.set_clock_skew("node-4", offset=-1.0)  # one second behind
    dht["node-1"].put("key1", "first")
    first = dht["node-0"].read("key1").clock
    dht["node-4"].put("key1", "second")  # later, acknowledged, by the slow clock
    for n in sorted(dht.nodes):
        assert dht[n].get("key1") == "second"
    second = dht["node-0"].read("key1").clock
    assert descends(second, first) and second != first


def test_schedule_3_with_wall_clock_versions_the_later_write_loses() -> None:
    """The control: versions that are the coordinator's clock reading (last writer wins
    by wall clock) let the earlier write win."""
    dht = create_dht(6, replication_factor=3, seed=9, bug="wall-clock-versions")
    dht.kernel.network.set_clock_skew("node-4", offset=-1.0)
    dht["node-1"].put("key1", "first")
    dht["node-4"].put("key1", "second")
    assert dht["node-0"].get("key1") == "first"


# ---- anti-entropy, hand-off, repair, membership --------------------------------------------


def test_merkle_trees_find_exactly_the_leaves_that_differ() -> None:
    items = [(f"k{i}", bytes([i])) for i in range(50)]
    same = MerkleTree(items)
    assert MerkleTree(list(reversed(items))).digest(()) == same.digest(())
    changed = MerkleTree([(k, b"x" if k == "k7" else d) for k, d in items])
    assert differing_leaves(same, changed) == [leaf_of("k7", 3, 4)]
    missing = MerkleTree([(k, d) for k, d in items if k != "k9"])
    assert differing_leaves(same, missing) == [leaf_of("k9", 3, 4)]
    assert "k9" in same.keys(leaf_of("k9", 3, 4))


def test_anti_entropy_repairs_a_replica_without_any_read() -> None:
    dht = create_dht(5, replication_factor=3, seed=4)
    written = _fill(dht, KEYS[:30])
    dht.run_for(1.0)
    victim = "node-2"
    lost = [k for k in written if k in dht.nodes[victim].store][:5]
    for k in lost:
        del dht.nodes[victim].store[k]  # a disk that lost records
    sent_before = dht.kernel.stats.sent
    dht.run_for(6.0)
    for k in lost:
        assert dht.nodes[victim].value(k) == written[k]
    # The trees are compared level by level: far fewer messages than records.
    assert dht.kernel.stats.sent - sent_before < 400


def test_read_repair_restores_a_replica_that_lost_a_record() -> None:
    dht = create_dht(4, replication_factor=3, seed=4, anti_entropy_interval=1000.0)
    dht["node-0"].put("key1", "value1")
    dht.run_for(1.0)
    holders = sorted(dht.holders("key1"))
    lost = holders[-1]
    del dht.nodes[lost].store["key1"]
    assert dht["node-0"].get("key1") == "value1"
    dht.run_for(1.0)
    assert dht.nodes[lost].value("key1") == "value1"
    assert any(e[:2] == ("read-repair", lost) for _, _, e in dht.events)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(4, 6), seed=st.integers(0, 10_000), data=st.data())
def test_no_acknowledged_write_is_lost_with_n_minus_1_homes_down(n, seed, data) -> None:
    dht = create_dht(n, replication_factor=3, seed=seed)
    names = sorted(dht.nodes)
    during = data.draw(st.sets(st.sampled_from(names), max_size=2))
    for node in during:
        dht.stop(node)
    written = _fill(dht, KEYS[:40], seed)
    for node in during:
        dht.start(node)
    dht.run_for(8.0)  # hand-offs and anti-entropy
    assert all(not node.hints for node in dht.nodes.values())
    _placed_as_the_ring_says(dht, list(written))
    after = data.draw(st.sets(st.sampled_from(names), min_size=2, max_size=2))
    for node in after:
        dht.stop(node)
    live = [x for x in names if x not in dht.down]
    some = dht.nodes[live[0]]
    for k, v in written.items():
        assert dht.holders(k) & set(live), k  # still stored on a live home
        up_homes = [h for h in some.preference(k) if h in live]
        if len(up_homes) >= dht.config.rq:
            assert dht[live[-1]].get(k) == v, k
        else:
            with pytest.raises(QuorumError):
                dht[live[-1]].get(k)


def test_with_w_plus_rq_not_above_n_a_sloppy_read_can_miss_the_write() -> None:
    """Sloppy mode allows W + Rq <= N, and then a replica may answer stale."""
    dht = create_dht(5, replication_factor=3, write_quorum=1, read_quorum=1, seed=1, mode="sloppy")
    some = dht["node-0"].node
    for k in KEYS:
        a, b, _ = some.preference(k)
        dht[a].put(k, "old")
        dht.run_for(1.0)
        dht[a].put(k, "new")  # acknowledged by a alone; b has not seen it yet
        if dht[b].get(k) == "old":
            return
    pytest.fail("W + Rq <= N never gave a stale read")


def test_keys_are_handed_off_on_join_and_on_leave() -> None:
    dht = create_dht(5, replication_factor=2, seed=5)
    written = _fill(dht, KEYS)
    dht.run_for(1.0)
    _placed_as_the_ring_says(dht, KEYS)
    dht.join("node-5")
    taken = [k for k in KEYS if k in dht.nodes["node-5"].store]
    # The newcomer holds about N/nodes of the keys, handed off by the others, who let go.
    assert 0.1 * len(KEYS) < len(taken) < 0.6 * len(KEYS)
    _placed_as_the_ring_says(dht, KEYS)
    dht.leave("node-2")
    assert "node-2" not in dht.nodes
    _placed_as_the_ring_says(dht, KEYS)
    for k, v in written.items():
        assert dht["node-5"].get(k) == v


def test_a_late_answer_to_an_operation_of_a_crashed_incarnation_is_not_taken_for_a_new_one():
    from twlb.sim.dht import DhtNode, StoreAck

    from twlb.protocol import ClientRequest, Operation, OpKind

    config = {"replication_factor": 3}
    peers = ["b", "c", "d"]
    node = DhtNode("a", peers, random.Random(0), config)
    fx = node.on_request(ClientRequest("cl", 1, Operation(OpKind.GET, "k")), 0.0)
    old_ids = {m.op_id for _dst, m in fx.send}
    again = DhtNode.recover("a", peers, random.Random(0), config, node.persistent_state())
    fx = again.on_request(ClientRequest("cl", 2, Operation(OpKind.GET, "k")), 1.0)
    new_ids = {m.op_id for _dst, m in fx.send}
    assert old_ids and new_ids and not old_ids & new_ids
    late = again.on_message("b", StoreAck(next(iter(old_ids)), "k"), 1.01)
    assert not late.replies
