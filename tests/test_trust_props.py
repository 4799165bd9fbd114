"""Property tests of the trust engine: the floor and the weight bounds hold for any history."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.balancer.features import WindowStats, compute_features
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine, TrustState

FLEET = [f"b{i}" for i in range(6)]

windows = st.builds(
    lambda n, ok, err, to, audits, odd, checks, down: WindowStats(
        requests=n,
        successes=min(ok, n),
        errors_5xx=min(err, n - min(ok, n)),
        timeouts=min(to, n - min(ok, n) - min(err, n - min(ok, n))),
        latency_p50_s=0.01 if n else None,
        latency_p95_s=0.02 if n else None,
        latency_p99_s=0.05 if n else None,
        audits=audits,
        audit_mismatches=min(odd, audits),
        health_checks=checks,
        health_failures=min(down, checks),
    ),
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(0, 30),
    st.integers(0, 30),
    st.integers(0, 5),
    st.integers(0, 5),
)

histories = st.lists(
    st.tuples(st.dictionaries(st.sampled_from(FLEET), windows), st.floats(0.1, 40.0)),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(history=histories, fraction=st.sampled_from([0.0, 0.2, 0.34, 0.5, 1.0]))
def test_never_more_than_the_floor_ejected_and_weights_stay_in_bounds(history, fraction) -> None:
    engine = TrustEngine(HeuristicScorer(), max_ejected_fraction=fraction)
    engine.set_backends(FLEET, 0.0)
    limit = int(fraction * len(FLEET) + 1e-9)
    now = 0.0
    for stats, dt in history:
        now += dt
        engine.update(compute_features(stats), now)
        states = [engine.state(b) for b in FLEET]
        assert states.count(TrustState.EJECTED) <= limit
        assert all(0.0 <= engine.weight(b) <= 1.0 for b in FLEET)
        assert set(engine.admitted) == {b for b in FLEET if engine.state(b) != "ejected"}
        for b in FLEET:
            probs = engine.probabilities(b)
            assert not probs or abs(sum(probs.values()) - 1.0) < 1e-9
