"""Backend health: the transition table walked completely, and observations to events."""

from __future__ import annotations

import pytest
from twlb.balancer.health import TRANSITIONS, HealthEvent, HealthState, HealthTracker

from twlb.outcome import Outcome


def _tracker(**kwargs) -> HealthTracker:
    tracker = HealthTracker(**kwargs)
    tracker.set_backends(["a", "b"], 0.0)
    return tracker


def test_transition_table_is_total() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in HealthState for e in HealthEvent}


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS))
def test_every_transition_lands_where_the_table_says(state, event) -> None:
    tracker = _tracker()
    # Drive "a" into `state` through the table itself, then fire the event.
    route = {
        HealthState.UNKNOWN: [],
        HealthState.HEALTHY: [HealthEvent.RISE],
        HealthState.UNHEALTHY: [HealthEvent.FALL],
    }[state]
    for step in route:
        tracker.apply("a", step, 1.0)
    assert tracker.state("a") is state
    assert tracker.apply("a", event, 2.0) is TRANSITIONS[(state, event)]
    assert tracker.is_up("a") is (TRANSITIONS[(state, event)] is not HealthState.UNHEALTHY)


def test_new_backends_start_unknown_and_count_as_up() -> None:
    tracker = _tracker()
    assert tracker.state("a") is HealthState.UNKNOWN
    assert tracker.up(["b", "a", "gone"]) == ["b", "a"]


def test_a_failed_check_takes_an_unknown_backend_out() -> None:
    tracker = _tracker()
    assert tracker.on_check("a", False, 1.0) is HealthState.UNHEALTHY
    assert tracker.up(["a", "b"]) == ["b"]


def test_healthy_backend_falls_after_unhealthy_threshold_failed_checks() -> None:
    tracker = _tracker(healthy_threshold=2, unhealthy_threshold=3)
    tracker.on_check("a", True, 1.0)
    assert tracker.state("a") is HealthState.UNKNOWN
    tracker.on_check("a", True, 2.0)
    assert tracker.state("a") is HealthState.HEALTHY
    tracker.on_check("a", False, 3.0)
    tracker.on_check("a", False, 4.0)
    tracker.on_check("a", True, 5.0)  # a pass breaks the run of failures
    tracker.on_check("a", False, 6.0)
    tracker.on_check("a", False, 7.0)
    assert tracker.is_up("a")
    assert tracker.on_check("a", False, 8.0) is HealthState.UNHEALTHY
    assert tracker.describe("a")["since"] == 8.0


def test_auto_recovery_after_healthy_threshold_passing_checks() -> None:
    tracker = _tracker(healthy_threshold=2)
    tracker.on_check("a", False, 1.0)
    tracker.on_check("a", True, 2.0)
    assert not tracker.is_up("a")
    assert tracker.on_check("a", True, 3.0) is HealthState.HEALTHY


def test_passive_failures_take_a_backend_out_but_answers_reset_the_run() -> None:
    tracker = _tracker(passive_failures=5, passive_cooldown_s=10.0)
    for _ in range(4):
        tracker.on_passive("a", Outcome.TIMEOUT, 1.0)
    tracker.on_passive("a", Outcome.ERROR, 1.0)  # a 5xx is an answer: the node is alive
    for _ in range(4):
        tracker.on_passive("a", Outcome.CONNECT_ERROR, 1.0)
    assert tracker.is_up("a")
    assert tracker.on_passive("a", Outcome.CONNECT_ERROR, 2.0) is HealthState.UNHEALTHY
    assert tracker.on_passive("gone", Outcome.TIMEOUT, 2.0) is HealthState.UNKNOWN


def test_passive_cooldown_holds_off_passing_checks_then_returns_unknown() -> None:
    tracker = _tracker(passive_failures=2, passive_cooldown_s=10.0, healthy_threshold=2)
    tracker.on_passive("a", Outcome.TIMEOUT, 1.0)
    tracker.on_passive("a", Outcome.TIMEOUT, 1.0)
    for t in (2.0, 3.0, 4.0):  # /healthz answers, but real work timed out
        tracker.on_check("a", True, t)
    assert not tracker.is_up("a")
    assert tracker.tick(10.9) == []
    assert tracker.tick(11.0) == ["a"]
    assert tracker.state("a") is HealthState.UNKNOWN


def test_a_failed_check_during_cooldown_hands_the_decision_to_checks() -> None:
    tracker = _tracker(passive_failures=1, passive_cooldown_s=5.0, healthy_threshold=2)
    tracker.on_passive("a", Outcome.CONNECT_ERROR, 1.0)
    tracker.on_check("a", False, 2.0)
    assert tracker.tick(20.0) == []  # no cooldown return: it is down on checks now
    assert not tracker.is_up("a")
    tracker.on_check("a", True, 21.0)
    assert tracker.on_check("a", True, 22.0) is HealthState.HEALTHY


def test_backends_keep_their_health_across_set_backends() -> None:
    tracker = _tracker()
    tracker.on_check("a", False, 1.0)
    tracker.set_backends(["a", "c"], 2.0)
    assert tracker.backends == ["a", "c"]
    assert not tracker.is_up("a") and tracker.is_up("c") and not tracker.is_up("b")


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthTracker(healthy_threshold=0)
    with pytest.raises(ValueError, match="passive_cooldown_s"):
        HealthTracker(passive_cooldown_s=-1)
