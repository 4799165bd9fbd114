"""Property tests of the routing policies: invariants over generated event sequences."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.balancer.policies import make_policy
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine, TrustEvent

from twlb.outcome import Outcome
from twlb.spec import NodeClass, PolicyName

BACKENDS = [f"b{i}" for i in range(6)]

events = st.lists(
    st.tuples(
        st.sampled_from(["pick", "start", "end", "tick"]),
        st.sets(st.sampled_from(BACKENDS), max_size=6).map(sorted),
        st.sampled_from(list(Outcome)),
        st.floats(min_value=0.0, max_value=2.0),
        st.one_of(st.none(), st.text(min_size=1, max_size=8)),
    ),
    max_size=60,
)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(list(PolicyName)), steps=events, seed=st.integers(0, 1000))
def test_pick_returns_one_of_the_candidates_or_none(name, steps, seed) -> None:
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(BACKENDS, 0.0)
    engine.apply("b0", TrustEvent.LOW, 0.0)
    truth = {b: NodeClass.HEALTHY if b != "b1" else NodeClass.ERROR for b in BACKENDS}
    policy = make_policy(name, seed=seed, trust_engine=engine, truth=truth.__getitem__)
    policy.set_backends(BACKENDS, 0.0)
    now = 0.0
    for kind, candidates, outcome, dt, key in steps:
        now += dt
        if kind == "pick":
            chosen = policy.pick(candidates, now, key=key)
            assert chosen is None or chosen in candidates
            if candidates and name in (PolicyName.ROUND_ROBIN, PolicyName.RANDOM):
                assert chosen is not None
        elif kind == "start" and candidates:
            policy.on_start(candidates[0], now)
        elif kind == "end" and candidates:
            policy.on_end(candidates[0], now, outcome, dt)
        else:
            policy.tick(now)
        for b in BACKENDS:
            assert policy.describe(b)["inflight"] >= 0


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_wrr_picks_each_backend_its_weight_times_per_cycle(weights) -> None:
    backends = BACKENDS[: len(weights)]
    policy = make_policy("weighted-round-robin", weights=dict(zip(backends, weights, strict=True)))
    policy.set_backends(backends, 0.0)
    cycle = sum(weights)
    for _ in range(3):  # every full cycle, not only the first
        counts = Counter(policy.pick(backends, 0.0) for _ in range(cycle))
        assert counts == dict(zip(backends, weights, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=30),
    algorithm=st.sampled_from(["sha256", "md5"]),
)
def test_consistent_hash_is_stable_for_a_fixed_ring(keys, algorithm) -> None:
    one = make_policy("consistent-hash", hash_algorithm=algorithm, vnodes=40)
    two = make_policy("consistent-hash", hash_algorithm=algorithm, vnodes=40)
    one.set_backends(BACKENDS, 0.0)
    two.set_backends(list(reversed(BACKENDS)), 0.0)  # the ring does not depend on order
    first = [one.pick(BACKENDS, 0.0, key=k) for k in keys]
    assert first == [one.pick(BACKENDS, 5.0, key=k) for k in keys]
    assert first == [two.pick(BACKENDS, 0.0, key=k) for k in keys]
