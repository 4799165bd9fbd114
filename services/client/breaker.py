"""A sans-IO circuit breaker on resilience4j's model: calls and `now` in, decisions out.

The breaker is closed while the failure rate and the slow-call rate over a sliding
window (the last N calls, or the calls of the last N seconds) stay below their
thresholds; once at least `minimum_calls` calls are in the window and either rate
reaches its threshold it opens and refuses calls for `wait_in_open_s`. Then it lets
`permitted_calls_in_half_open` trial calls through: if their rates are below the
thresholds it closes, otherwise it opens again. Every state change goes through
`TRANSITIONS` and is reported to listeners. It reads no clock and does no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from twlb.options import Flag


class BreakerState(StrEnum):
    """Where the breaker is: letting calls through, refusing them, or trying a few."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerTrigger(StrEnum):
    """Why the breaker changes state."""

    RATES_EXCEEDED = "rates_exceeded"  # closed window over a threshold
    WAIT_ELAPSED = "wait_elapsed"  # open long enough to try again
    TRIALS_PASSED = "trials_passed"  # half-open trial calls below the thresholds
    TRIALS_FAILED = "trials_failed"  # half-open trial calls at or over a threshold
    TRIALS_TIMED_OUT = "trials_timed_out"  # trial calls did not finish in time


#: Every legal state change: (from, trigger) -> to. Nothing else can happen.
TRANSITIONS: dict[tuple[BreakerState, BreakerTrigger], BreakerState] = {
    (BreakerState.CLOSED, BreakerTrigger.RATES_EXCEEDED): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerTrigger.WAIT_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerTrigger.TRIALS_PASSED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerTrigger.TRIALS_FAILED): BreakerState.OPEN,
    (BreakerState.HALF_OPEN, BreakerTrigger.TRIALS_TIMED_OUT): BreakerState.OPEN,
}


class WindowType(StrEnum):
    """How the closed state's sliding window is measured."""

    COUNT = "count"  # the last `window_size` calls
    TIME = "time"  # the calls of the last `window_size` seconds


class BreakerConfig(BaseModel):
    """resilience4j's settings, with defaults sized for a load generator on loopback; each
    declared once, here (`twlb load`'s --breaker-* flags come from these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_rate_threshold: Annotated[
        float, Flag("--breaker-failure-rate", param="breaker_failure_rate")
    ] = Field(
        50.0,
        gt=0.0,
        le=100.0,
        description="Failure rate (percent) of calls that opens the breaker.",
    )
    slow_call_rate_threshold: Annotated[
        float, Flag("--breaker-slow-call-rate", param="breaker_slow_call_rate")
    ] = Field(
        100.0,
        gt=0.0,
        le=100.0,
        description="Rate (percent) of slow calls that opens the breaker (100: only a window "
        "of nothing but slow calls).",
    )
    slow_call_duration_s: Annotated[
        float, Flag("--breaker-slow-call", param="breaker_slow_call")
    ] = Field(1.0, gt=0.0, le=3600.0, description="A call this slow (seconds) counts as slow.")
    window_type: Annotated[
        WindowType, Flag("--breaker-window-type", param="breaker_window_type")
    ] = Field(
        WindowType.COUNT,
        description="The breaker's window: the last N calls (count) or the calls of the "
        "last N seconds (time).",
    )
    window_size: Annotated[int, Flag("--breaker-window", param="breaker_window")] = Field(
        50, ge=1, le=100_000, description="The breaker's window: calls (count) or seconds (time)."
    )
    minimum_calls: Annotated[int, Flag("--breaker-min-calls", param="breaker_min_calls")] = Field(
        20, ge=1, le=100_000, description="Calls in the window before the breaker judges."
    )
    wait_in_open_s: Annotated[float, Flag("--breaker-wait", param="breaker_wait")] = Field(
        2.0, ge=0.0, le=3600.0, description="Seconds the breaker stays open."
    )
    permitted_calls_in_half_open: Annotated[
        int, Flag("--breaker-trial-calls", param="breaker_trial_calls")
    ] = Field(
        5, ge=1, le=10_000, description="Trial calls let through half-open before it judges again."
    )
    max_wait_in_half_open_s: Annotated[
        float, Flag("--breaker-trial-wait", param="breaker_trial_wait")
    ] = Field(
        0.0,
        ge=0.0,
        le=3600.0,
        description="Seconds the half-open breaker waits for its trial calls before it opens "
        "again (0: however long they take).",
    )

    @model_validator(mode="after")
    def _window_can_judge(self) -> BreakerConfig:
        if self.window_type is WindowType.COUNT and self.minimum_calls > self.window_size:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) must not exceed a count window_size "
                f"({self.window_size}): the breaker could never judge"
            )
        return self


@dataclass(frozen=True)
class WindowRates:
    """What a window holds right now; rates are percentages, None below the minimum."""

    calls: int
    failures: int
    slow: int
    failure_rate: float | None
    slow_call_rate: float | None


def _rates(calls: int, failures: int, slow: int, minimum: int) -> WindowRates:
    if calls < minimum or calls == 0:
        return WindowRates(calls, failures, slow, None, None)
    return WindowRates(calls, failures, slow, 100.0 * failures / calls, 100.0 * slow / calls)


class CountWindow:
    """The outcomes of the last `size` calls (a ring with running totals)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._calls: deque[tuple[bool, bool]] = deque()
        self.failures = 0
        self.slow = 0

    def record(self, now: float, failed: bool, slow: bool) -> None:
        if len(self._calls) == self.size:
            old_failed, old_slow = self._calls.popleft()
            self.failures -= old_failed
            self.slow -= old_slow
        self._calls.append((failed, slow))
        self.failures += failed
        self.slow += slow

    def rates(self, now: float, minimum: int) -> WindowRates:
        return _rates(len(self._calls), self.failures, self.slow, minimum)


class TimeWindow:
    """The outcomes of the calls of the last `size` seconds, in one-second buckets."""

    def __init__(self, size: int) -> None:
        self.size = size
        # [epoch second, calls, failures, slow]; oldest first.
        self._buckets: deque[list[int]] = deque()
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def _expire(self, now: float) -> None:
        oldest_kept = int(now // 1) - self.size + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            _, calls, failures, slow = self._buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def record(self, now: float, failed: bool, slow: bool) -> None:
        self._expire(now)
        second = int(now // 1)
        if not self._buckets or self._buckets[-1][0] < second:
            self._buckets.append([second, 0, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def rates(self, now: float, minimum: int) -> WindowRates:
        self._expire(now)
        return _rates(self.calls, self.failures, self.slow, minimum)


@dataclass(frozen=True)
class BreakerTransition:
    """One state change, as reported to listeners."""

    from_state: BreakerState
    to_state: BreakerState
    trigger: BreakerTrigger
    at: float
    rates: WindowRates | None


BreakerListener = Callable[[BreakerTransition], None]


class CircuitBreaker:
    """One target's breaker. Ask `allow(now)` before a call, then `record` or `release`."""

    def __init__(
        self, config: BreakerConfig | None = None, listeners: list[BreakerListener] | None = None
    ) -> None:
        self.config = config or BreakerConfig()
        self.listeners: list[BreakerListener] = list(listeners or [])
        self.state = BreakerState.CLOSED
        self.changed_at = 0.0
        self._window: CountWindow | TimeWindow = self._closed_window()
        self._trials = CountWindow(self.config.permitted_calls_in_half_open)
        self._trial_permits = 0
        self.not_permitted_total = 0

    def _closed_window(self) -> CountWindow | TimeWindow:
        if self.config.window_type is WindowType.TIME:
            return TimeWindow(self.config.window_size)
        return CountWindow(self.config.window_size)

    def _transition(self, trigger: BreakerTrigger, now: float, rates: WindowRates | None) -> None:
        to_state = TRANSITIONS[(self.state, trigger)]
        change = BreakerTransition(self.state, to_state, trigger, now, rates)
        self.state = to_state
        self.changed_at = now
        if to_state is BreakerState.CLOSED:
            self._window = self._closed_window()
        elif to_state is BreakerState.HALF_OPEN:
            self._trials = CountWindow(self.config.permitted_calls_in_half_open)
            self._trial_permits = 0
        for listener in self.listeners:
            listener(change)

    def poll(self, now: float) -> BreakerState:
        """Apply the transitions that time alone causes; return the current state."""
        cfg = self.config
        if self.state is BreakerState.OPEN and now - self.changed_at >= cfg.wait_in_open_s:
            self._transition(BreakerTrigger.WAIT_ELAPSED, now, None)
        elif (
            self.state is BreakerState.HALF_OPEN
            and cfg.max_wait_in_half_open_s > 0
            and now - self.changed_at >= cfg.max_wait_in_half_open_s
        ):
            self._transition(BreakerTrigger.TRIALS_TIMED_OUT, now, self._trial_rates())
        return self.state

    def allow(self, now: float) -> bool:
        """May a call start now? In half-open, True takes one of the trial permits."""
        state = self.poll(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._trial_permits < (
            self.config.permitted_calls_in_half_open
        ):
            self._trial_permits += 1
            return True
        self.not_permitted_total += 1
        return False

    def release(self, now: float) -> None:
        """A permitted call was abandoned without an outcome (e.g. a cancelled hedge)."""
        if self.state is BreakerState.HALF_OPEN and self._trial_permits > 0:
            self._trial_permits -= 1

    def _trial_rates(self) -> WindowRates:
        return self._trials.rates(0.0, self.config.permitted_calls_in_half_open)

    def record(self, now: float, success: bool, duration_s: float) -> None:
        """A permitted call ended at `now` after `duration_s`; `success` is the caller's verdict."""
        cfg = self.config
        state = self.poll(now)
        failed = not success
        slow = duration_s >= cfg.slow_call_duration_s
        if state is BreakerState.CLOSED:
            self._window.record(now, failed, slow)
            rates = self._window.rates(now, cfg.minimum_calls)
            if self._over_threshold(rates):
                self._transition(BreakerTrigger.RATES_EXCEEDED, now, rates)
        elif state is BreakerState.HALF_OPEN:
            self._trials.record(now, failed, slow)
            rates = self._trial_rates()
            if rates.failure_rate is not None:
                trigger = (
                    BreakerTrigger.TRIALS_FAILED
                    if self._over_threshold(rates)
                    else BreakerTrigger.TRIALS_PASSED
                )
                self._transition(trigger, now, rates)
        # In open, a late answer from a call started before the breaker opened changes nothing.

    def _over_threshold(self, rates: WindowRates) -> bool:
        if rates.failure_rate is None or rates.slow_call_rate is None:
            return False
        return (
            rates.failure_rate >= self.config.failure_rate_threshold
            or rates.slow_call_rate >= self.config.slow_call_rate_threshold
        )

    def rates(self, now: float) -> WindowRates:
        """The closed-state window's current rates (for display and metrics)."""
        return self._window.rates(now, self.config.minimum_calls)
