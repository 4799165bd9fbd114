"""The circuit breaker as a pure state machine on a fake clock (no I/O, no real time)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.client.breaker import (
    TRANSITIONS,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    BreakerTrigger,
    CircuitBreaker,
    WindowType,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def _breaker(**overrides: object) -> tuple[CircuitBreaker, list[BreakerTransition]]:
    seen: list[BreakerTransition] = []
    cfg = BreakerConfig(
        **{
            "window_size": 10,
            "minimum_calls": 4,
            "wait_in_open_s": 5.0,
            "permitted_calls_in_half_open": 2,
            **overrides,
        }
    )
    return CircuitBreaker(cfg, listeners=[seen.append]), seen


def _fail(b: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        assert b.allow(now)
        b.record(now, success=False, duration_s=0.01)


def _succeed(b: CircuitBreaker, now: float, n: int = 1, duration_s: float = 0.01) -> None:
    for _ in range(n):
        assert b.allow(now)
        b.record(now, success=True, duration_s=duration_s)


def test_every_transition_in_the_table_happens_and_nothing_else() -> None:
    b, seen = _breaker(max_wait_in_half_open_s=3.0)
    _fail(b, 0.0, 4)  # closed -> open
    assert b.state is OPEN
    assert b.poll(5.0) is HALF_OPEN  # open -> half_open
    _fail(b, 5.0, 2)  # half_open -> open (trials failed)
    b.poll(10.0)
    _succeed(b, 10.0, 2)  # half_open -> closed (trials passed)
    assert b.state is CLOSED
    _fail(b, 11.0, 4)
    b.poll(16.0)
    assert b.allow(16.0)  # one trial starts and never finishes
    assert b.poll(19.0) is OPEN  # half_open -> open (trials timed out)

    walked = {(t.from_state, t.trigger): t.to_state for t in seen}
    assert walked == TRANSITIONS
    for t in seen:
        assert TRANSITIONS[(t.from_state, t.trigger)] is t.to_state
    assert [t.at for t in seen] == sorted(t.at for t in seen)


def test_closed_ignores_failures_below_the_minimum_number_of_calls() -> None:
    b, seen = _breaker(minimum_calls=5)
    _fail(b, 0.0, 4)
    assert b.state is CLOSED and not seen
    assert b.rates(0.0).failure_rate is None
    _fail(b, 0.0, 1)
    assert b.state is OPEN
    assert seen[0].rates is not None and seen[0].rates.failure_rate == 100.0


def test_failure_rate_threshold_is_inclusive_and_below_it_stays_closed() -> None:
    b, _ = _breaker(window_size=4, minimum_calls=4, failure_rate_threshold=50.0)
    _succeed(b, 0.0, 2)
    _fail(b, 0.0, 1)
    assert b.state is CLOSED  # 1 of 3, below the minimum anyway
    _succeed(b, 0.0, 1)
    assert b.state is CLOSED  # 1 of 4 = 25 %
    _fail(b, 0.0, 1)
    assert b.state is OPEN  # window is the last 4: 2 failures of 4 = 50 %


def test_count_window_forgets_calls_older_than_its_size() -> None:
    b, _ = _breaker(window_size=5, minimum_calls=5, failure_rate_threshold=60.0)
    _fail(b, 0.0, 2)
    _succeed(b, 0.0, 5)  # the two failures slide out
    assert b.rates(0.0).failures == 0
    _fail(b, 0.0, 2)
    assert b.state is CLOSED  # 2 of 5 = 40 %
    _fail(b, 0.0, 1)
    assert b.state is OPEN  # 3 of 5 = 60 %


def test_time_window_forgets_calls_older_than_its_seconds() -> None:
    b, _ = _breaker(window_type=WindowType.TIME, window_size=5, minimum_calls=4)
    _fail(b, 0.2, 3)  # below the minimum
    _succeed(b, 6.0, 1)  # the failures of second 0 are out of [2, 6]
    rates = b.rates(6.0)
    assert (rates.calls, rates.failures) == (1, 0)
    _fail(b, 6.5, 2)
    assert b.state is CLOSED  # 2 of 3 calls, below the minimum
    _fail(b, 7.0, 1)
    assert b.state is OPEN  # 3 of 4 = 75 %


def test_time_window_counts_every_call_within_its_seconds() -> None:
    b, _ = _breaker(window_type=WindowType.TIME, window_size=10, minimum_calls=10)
    for second in range(9):
        _fail(b, second + 0.5, 1)
    assert b.state is CLOSED
    assert b.rates(8.9).calls == 9
    _fail(b, 9.9, 1)  # ten failures over seconds 0..9, all inside the window
    assert b.state is OPEN


def test_slow_successful_calls_open_the_breaker_at_the_slow_call_threshold() -> None:
    b, seen = _breaker(slow_call_rate_threshold=50.0, slow_call_duration_s=1.0)
    _succeed(b, 0.0, 2, duration_s=0.2)
    _succeed(b, 0.0, 1, duration_s=1.5)
    assert b.state is CLOSED
    _succeed(b, 0.0, 1, duration_s=1.0)  # a call as long as the threshold is slow
    assert b.state is OPEN
    rates = seen[0].rates
    assert rates is not None and rates.failure_rate == 0.0 and rates.slow_call_rate == 50.0


def test_open_refuses_calls_until_the_wait_has_elapsed() -> None:
    b, _ = _breaker(wait_in_open_s=5.0)
    _fail(b, 10.0, 4)
    assert not b.allow(10.0)
    assert not b.allow(14.999)
    assert b.not_permitted_total == 2
    assert b.allow(15.0)
    assert b.state is HALF_OPEN


def test_half_open_lets_exactly_the_permitted_trials_through() -> None:
    b, _ = _breaker(permitted_calls_in_half_open=3)
    _fail(b, 0.0, 4)
    assert [b.allow(5.0) for _ in range(4)] == [True, True, True, False]
    b.release(5.0)  # an abandoned trial gives its permit back
    assert b.allow(5.0)
    assert not b.allow(5.0)


def test_half_open_decides_only_once_all_trials_have_answered() -> None:
    b, seen = _breaker(permitted_calls_in_half_open=3, failure_rate_threshold=50.0)
    _fail(b, 0.0, 4)
    b.poll(5.0)
    _fail(b, 5.1, 1)
    _succeed(b, 5.2, 1)
    assert b.state is HALF_OPEN
    _succeed(b, 5.3, 1)  # 1 failure of 3 trials = 33 %
    assert b.state is CLOSED
    assert seen[-1].trigger is BreakerTrigger.TRIALS_PASSED
    assert b.rates(5.3).calls == 0  # closing starts a fresh window


def test_a_late_answer_while_open_changes_nothing() -> None:
    b, seen = _breaker()
    _fail(b, 0.0, 4)
    b.record(1.0, success=True, duration_s=0.01)
    b.record(1.0, success=False, duration_s=0.01)
    assert b.state is OPEN and len(seen) == 1


def test_half_open_timeout_is_off_by_default() -> None:
    b, _ = _breaker()
    _fail(b, 0.0, 4)
    assert b.allow(5.0)
    assert b.poll(10_000.0) is HALF_OPEN


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_rate_threshold", 0.0),
        ("slow_call_rate_threshold", 101.0),
        ("slow_call_duration_s", 0.0),
        ("window_size", 0),
        ("minimum_calls", 0),
        ("permitted_calls_in_half_open", 0),
        ("wait_in_open_s", -1.0),
        ("minimum_calls", 51),  # more than the count window holds
    ],
)
def test_bad_config_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**{field: value})


events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0),  # time step
        st.sampled_from(["allow", "ok", "fail", "slow", "release"]),
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(events, st.sampled_from(list(WindowType)))
def test_any_event_sequence_follows_the_table_and_respects_the_wait(
    steps: list[tuple[float, str]], window_type: WindowType
) -> None:
    b, seen = _breaker(window_type=window_type, max_wait_in_half_open_s=4.0)
    now = 0.0
    for dt, event in steps:
        now += dt
        opened_at = b.changed_at if b.state is OPEN else None
        if event == "allow":
            allowed = b.allow(now)
            if opened_at is not None and now - opened_at < b.config.wait_in_open_s:
                assert not allowed
        elif event == "release":
            b.release(now)
        else:
            b.record(now, success=event != "fail", duration_s=2.0 if event == "slow" else 0.01)
    previous = CLOSED
    for t in seen:
        assert t.from_state is previous
        assert TRANSITIONS[(t.from_state, t.trigger)] is t.to_state
        previous = t.to_state
    assert previous is b.state
