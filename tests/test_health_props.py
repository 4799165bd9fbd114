"""Property tests of health tracking: whatever happened before, checks decide in the end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.balancer.health import HealthState, HealthTracker

from twlb.outcome import Outcome

observations = st.lists(
    st.tuples(
        st.sampled_from(["check", "passive", "tick"]),
        st.booleans(),
        st.sampled_from(list(Outcome)),
        st.floats(0.0, 5.0),
    ),
    max_size=80,
)


@settings(max_examples=80, deadline=None)
@given(
    history=observations,
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    passive=st.integers(1, 6),
)
def test_checks_always_recover_and_take_out_a_backend(history, rise, fall, passive) -> None:
    tracker = HealthTracker(
        healthy_threshold=rise,
        unhealthy_threshold=fall,
        passive_failures=passive,
        passive_cooldown_s=10.0,
    )
    tracker.set_backends(["a"], 0.0)
    now = 0.0
    for kind, ok, outcome, dt in history:
        now += dt
        if kind == "check":
            tracker.on_check("a", ok, now)
        elif kind == "passive":
            tracker.on_passive("a", outcome, now)
        else:
            tracker.tick(now)
        assert tracker.is_up("a") is (tracker.state("a") is not HealthState.UNHEALTHY)
    now += 10.0  # past any passive cooldown
    for i in range(rise):
        tracker.on_check("a", True, now + i)
    assert tracker.state("a") is HealthState.HEALTHY
    for i in range(fall):
        tracker.on_check("a", False, now + rise + i)
    assert tracker.state("a") is HealthState.UNHEALTHY
