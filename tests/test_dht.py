"""The replicated hash table: quorums, failures, hinted hand-off, read repair, join and leave."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.sim.dht import DhtConfig, LocalDht, QuorumError, create_dht

KEYS = [f"key{i}" for i in range(120)]


def _fill(dht: LocalDht, keys: list[str], seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    names = sorted(dht.nodes)
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
    """Every key is held by exactly its R replicas on the current ring."""
    some = next(iter(dht.nodes.values()))
    for k in keys:
        assert dht.holders(k) == set(some.preference(k)), k


def test_the_founding_api_puts_gets_and_deletes() -> None:
    dht = create_dht(["a", "b", "c", "d"], replication_factor=2)
    dht_node = dht["a"]
    assert dht_node.put("key1", "value1") == "value1"
    assert dht_node.get("key1") == "value1"
    assert dht["d"].get("key1") == "value1"  # any node coordinates
    dht["c"].delete("key1")
    assert dht_node.get("key1") is None
    assert len(dht.holders("key1")) == 0
    with pytest.raises(KeyError, match="zz"):
        dht["zz"]


def test_bad_quorums_are_refused() -> None:
    with pytest.raises(ValueError, match="write_quorum"):
        create_dht(3, replication_factor=2, write_quorum=3)
    with pytest.raises(ValueError, match="read_quorum"):
        DhtConfig(replication_factor=3, read_quorum=0)
    with pytest.raises(ValueError, match="distinct"):
        create_dht(["a", "a"])


@settings(max_examples=15, deadline=None)
@given(
    r=st.integers(2, 3),
    n=st.integers(3, 6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_no_acknowledged_write_is_lost_with_r_minus_1_replicas_down(r, n, seed, data) -> None:
    dht = create_dht(n, replication_factor=r, seed=seed)
    names = sorted(dht.nodes)
    rng = random.Random(seed)
    # Up to R-1 nodes are down while the writes happen (their copies go to stand-ins).
    during = data.draw(st.sets(st.sampled_from(names), max_size=r - 1))
    for node in during:
        dht.stop(node)
    written = _fill(dht, KEYS[:60], seed)
    assert written or n - len(during) < dht.config.w
    dht.run_for(2.0)
    live = [x for x in names if x not in dht.down]
    for k, v in written.items():
        assert dht[rng.choice(live)].get(k) == v
    # They come back and take their hinted copies; then any R-1 nodes go down.
    for node in during:
        dht.start(node)
    dht.run_for(3.0)
    assert all(not node.hints for node in dht.nodes.values())
    _placed_as_the_ring_says(dht, list(written))
    after = data.draw(st.sets(st.sampled_from(names), min_size=r - 1, max_size=r - 1))
    for node in after:
        dht.stop(node)
    live = [x for x in names if x not in dht.down]
    for k, v in written.items():
        assert dht.holders(k) & set(live), k  # still stored on a live replica
        if len(live) >= dht.config.rq:  # and readable wherever a read quorum is up
            assert dht[rng.choice(live)].get(k) == v, k


@settings(max_examples=15, deadline=None)
@given(
    quorums=st.sampled_from([(2, 2), (1, 3), (3, 1), (2, 3)]),
    seed=st.integers(0, 10_000),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "delete"]), st.integers(0, 4), st.integers(0, 4)),
        min_size=1,
        max_size=40,
    ),
)
def test_reads_see_the_last_acknowledged_write_when_w_plus_rq_exceeds_r(quorums, seed, ops) -> None:
    w, rq = quorums
    dht = create_dht(5, replication_factor=3, write_quorum=w, read_quorum=rq, seed=seed)
    names = sorted(dht.nodes)
    model: dict[str, str] = {}
    for i, (kind, key_i, node_i) in enumerate(ops):
        key, node = f"k{key_i}", dht[names[node_i]]
        if kind == "put":
            node.put(key, f"v{i}")
            model[key] = f"v{i}"
        elif kind == "delete":
            node.delete(key)
            model.pop(key, None)
        else:
            assert node.get(key) == model.get(key)


def test_with_w_plus_rq_not_above_r_a_read_can_miss_the_write() -> None:
    """The control for the test above: W = Rq = 1 of R = 3 lets a replica answer stale."""
    dht = create_dht(5, replication_factor=3, write_quorum=1, read_quorum=1, seed=1)
    some = dht["node-0"].node
    for k in KEYS:
        a, b, _ = some.preference(k)
        dht[a].put(k, "old")
        dht.run_for(1.0)
        dht[a].put(k, "new")  # acknowledged by a alone; b has not seen it yet
        if dht[b].get(k) == "old":
            return
    pytest.fail("W + Rq <= R never gave a stale read")


def test_hinted_handoff_gives_a_replica_the_writes_it_missed() -> None:
    dht = create_dht(5, replication_factor=2, seed=3)
    some = dht["node-0"].node
    key = next(
        k for k in KEYS if "node-4" in some.preference(k) and "node-0" not in some.preference(k)
    )
    dht.stop("node-4")
    dht["node-0"].put(key, "while-down")
    stand_ins = [n for n, node in dht.nodes.items() if key in node.hints.get("node-4", {})]
    assert len(stand_ins) == 1 and stand_ins[0] not in some.preference(key)
    assert "node-4" not in dht.holders(key)
    dht.start("node-4")
    dht.run_for(2.0)
    assert dht.nodes["node-4"].store[key].value == "while-down"
    assert not dht.nodes[stand_ins[0]].hints
    assert any(e[0] == "handoff-in" for _, n, e in dht.events if n == "node-4")


def test_read_repair_restores_a_replica_that_lost_a_record() -> None:
    dht = create_dht(4, replication_factor=3, seed=4)
    dht["node-0"].put("key1", "value1")
    dht.run_for(1.0)
    holders = sorted(dht.holders("key1"))
    lost = holders[-1]
    del dht.nodes[lost].store["key1"]
    assert dht["node-0"].get("key1") == "value1"
    dht.run_for(1.0)
    assert dht.nodes[lost].store["key1"].value == "value1"
    assert any(e[:2] == ("read-repair", lost) for _, _, e in dht.events)


def test_keys_are_handed_off_on_join_and_on_leave() -> None:
    dht = create_dht(5, replication_factor=2, seed=5)
    written = _fill(dht, KEYS)
    dht.run_for(1.0)
    _placed_as_the_ring_says(dht, KEYS)
    dht.join("node-5")
    taken = [k for k in KEYS if k in dht.nodes["node-5"].store]
    # The newcomer holds about R/N of the keys, handed off by the others, who let go.
    assert 0.1 * len(KEYS) < len(taken) < 0.6 * len(KEYS)
    _placed_as_the_ring_says(dht, KEYS)
    dht.leave("node-2")
    assert "node-2" not in dht.nodes
    _placed_as_the_ring_says(dht, KEYS)
    for k, v in written.items():
        assert dht["node-5"].get(k) == v


def test_a_write_without_enough_replicas_fails_and_says_why() -> None:
    dht = create_dht(3, replication_factor=3, write_quorum=3, seed=6)
    dht.stop("node-2")
    with pytest.raises(QuorumError, match="2 of 3"):
        dht["node-0"].put("key1", "value1")
