"""Feature windows: per-backend event windows and the one pure function turning them into features.

The balancer records every upstream try, audit, health check and in-flight sample here,
and every tick turns the last `window_s` seconds of all backends into one feature row per
backend with `compute_features`. The training code imports the same function, so live
scoring and offline training see identical columns (`FEATURE_NAMES`, fixed order).

Memory is bounded whatever the request rate: events are folded into time buckets of
`resolution_s` seconds, each holding counters and a log-spaced latency histogram, and
buckets older than the window are dropped. Latency quantiles therefore carry the
histogram's relative error (`LATENCY_GROWTH`, 5 %), far below the differences between a
healthy and a slow node.

Conventions for windows without data (so a quiet backend looks neither sick nor healthy
by accident):
- no requests: `success_ratio` 1.0 and every failure ratio 0.0 (no evidence of failure);
- no latency samples, or no fleet median: `latency_p*_rel` 1.0 (as fast as the fleet);
- no audits: `audit_mismatch_ratio` 0.0; no health checks: `health_fail_ratio` 0.0;
- no in-flight samples: `inflight_mean` 0.0.
Latency quantiles cover answered tries and timeouts (a timeout's latency is the time
waited), not connection errors, whose near-zero latency says nothing about node speed.
Relative latencies are divided by the fleet median of p50 and capped at `REL_CAP`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from twlb.outcome import CONNECT_ERROR, Outcome

#: Feature columns, in the order every model file must name them (extend, never reorder).
FEATURE_NAMES: tuple[str, ...] = (
    "request_count_log1p",
    "success_ratio",
    "error_5xx_ratio",
    "timeout_ratio",
    "connect_error_ratio",
    "latency_p50_rel",
    "latency_p95_rel",
    "latency_p99_rel",
    "audit_mismatch_ratio",
    "audit_count_log1p",
    "health_fail_ratio",
    "inflight_mean",
)

#: Upper bound of relative latencies, so one stuck node cannot produce unbounded inputs.
REL_CAP = 100.0

#: Latency histogram: bucket i >= 1 covers [LATENCY_MIN_S * g**(i-1), LATENCY_MIN_S * g**i).
LATENCY_MIN_S = 50e-6
LATENCY_GROWTH = 1.05
LATENCY_BINS = 2 + math.ceil(math.log(600.0 / LATENCY_MIN_S) / math.log(LATENCY_GROWTH))
_LOG_GROWTH = math.log(LATENCY_GROWTH)
# Representative value of each bin: the geometric middle (bin 0 holds everything tinier).
_BIN_VALUES = np.array(
    [LATENCY_MIN_S / 2]
    + [LATENCY_MIN_S * LATENCY_GROWTH ** (i - 0.5) for i in range(1, LATENCY_BINS)]
)


def latency_bin(latency_s: float) -> int:
    """Histogram bin of a latency (seconds)."""
    if latency_s < LATENCY_MIN_S:
        return 0
    return min(LATENCY_BINS - 1, 1 + int(math.log(latency_s / LATENCY_MIN_S) / _LOG_GROWTH))


@dataclass(frozen=True)
class WindowStats:
    """Raw aggregates of one backend over one window (latencies in seconds, None if none)."""

    requests: int = 0
    successes: int = 0
    errors_5xx: int = 0
    timeouts: int = 0
    connect_errors: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_p99_s: float | None = None
    audits: int = 0
    audit_mismatches: int = 0
    health_checks: int = 0
    health_failures: int = 0
    inflight_mean: float = 0.0


_OUTCOMES = tuple(Outcome)  # iterating the enum class itself is slow, and buckets are many


class _Counts:
    """Everything recorded over a stretch of time: one bucket, or the sum of several."""

    __slots__ = (
        "outcomes",
        "hist",
        "audits",
        "mismatches",
        "checks",
        "check_failures",
        "inflight_sum",
        "inflight_samples",
    )

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(_OUTCOMES, 0)
        self.hist: dict[int, int] = {}  # latency bin -> count (sparse: few bins are used)
        self.clear()

    def clear(self) -> None:
        """Back to nothing recorded (the dicts are kept: a bucket is reused, not remade)."""
        for o in _OUTCOMES:
            self.outcomes[o] = 0
        self.hist.clear()
        self.audits = 0
        self.mismatches = 0
        self.checks = 0
        self.check_failures = 0
        self.inflight_sum = 0.0
        self.inflight_samples = 0

    def add(self, other: _Counts, sign: int = 1) -> None:
        """Add `other` into these counts (`sign` -1: take it out again)."""
        outcomes = self.outcomes
        for o, n in other.outcomes.items():
            outcomes[o] += sign * n
        hist = self.hist
        for i, n in other.hist.items():
            left = hist.get(i, 0) + sign * n
            if left:
                hist[i] = left
            else:
                del hist[i]
        self.audits += sign * other.audits
        self.mismatches += sign * other.mismatches
        self.checks += sign * other.checks
        self.check_failures += sign * other.check_failures
        self.inflight_sum += sign * other.inflight_sum
        self.inflight_samples += sign * other.inflight_samples


class _Bucket(_Counts):
    """Everything recorded during one `resolution_s` slice of time.

    A window reuses the buckets that leave it: with 1,000 backends, new buckets at every
    slice of every backend filled the cyclic collector's oldest generation (they live a
    whole window) and made its full collections, 85-135 ms each, frequent.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


def histogram_quantiles(hist: Mapping[int, int], qs: tuple[float, ...]) -> list[float | None]:
    """The q-quantiles (0..1, ascending) of a sparse latency histogram (bin -> count), each
    None if it is empty. One pass over the few bins in use: a trust tick computes these for
    every backend, so a large fleet must not pay for the hundreds of empty bins."""
    total = sum(hist.values())
    if total == 0:
        return [None] * len(qs)
    ranks = [max(1, math.ceil(q * total)) for q in qs]
    out: list[float | None] = []
    seen = 0
    for i, n in sorted(hist.items()):
        seen += n
        while len(out) < len(ranks) and seen >= ranks[len(out)]:
            out.append(float(_BIN_VALUES[i]))
        if len(out) == len(ranks):
            break
    return out


class FeatureWindow:
    """Timestamped events of one backend over the last `window_s` seconds, in fixed buckets.

    Memory per backend is at most `window_s / resolution_s` buckets, whatever the rate.
    The buckets before the newest are also kept summed as they close and leave, so a
    trust tick reads a backend's window in one merge instead of one per bucket (with
    1,000 backends this was most of the tick: bench/fleet_scale.py).
    """

    def __init__(self, window_s: float, resolution_s: float = 0.25) -> None:
        if resolution_s <= 0 or window_s < resolution_s:
            raise ValueError(f"need 0 < resolution_s <= window_s, got {resolution_s=} {window_s=}")
        self.window_s = window_s
        self.resolution_s = resolution_s
        self._buckets: deque[_Bucket] = deque()
        self._spare: list[_Bucket] = []  # buckets that left the window, for reuse
        self._closed = _Counts()  # the sum of every bucket but the newest

    def _bucket(self, now: float) -> _Bucket:
        index = math.floor(now / self.resolution_s)
        buckets = self._buckets
        if buckets:
            newest = buckets[-1]
            if newest.index >= index:
                # Events are recorded in time order; a late one (clock skew between
                # awaits) lands in the newest bucket rather than rewriting the past.
                return newest
            self._closed.add(newest)  # it will never be written again
        if self._spare:
            bucket = self._spare.pop()
            bucket.index = index
        else:
            bucket = _Bucket(index)
        buckets.append(bucket)
        self._expire(now)
        return bucket

    def _expire(self, now: float) -> None:
        oldest = math.floor((now - self.window_s) / self.resolution_s)
        buckets = self._buckets
        while buckets and buckets[0].index < oldest:
            gone = buckets.popleft()
            if buckets:  # the newest bucket was never added to the closed sum
                self._closed.add(gone, -1)
            else:
                self._closed.clear()
            gone.clear()
            self._spare.append(gone)

    def record_request(self, now: float, outcome: Outcome, latency_s: float) -> None:
        """One upstream try ended at `now` with `outcome` after `latency_s` seconds."""
        bucket = self._bucket(now)
        bucket.outcomes[outcome] += 1
        if outcome is not CONNECT_ERROR:
            hist = bucket.hist
            i = latency_bin(latency_s)
            hist[i] = hist.get(i, 0) + 1

    def record_audit(self, now: float, mismatch: bool) -> None:
        """This backend took part in an audit that reached agreement; `mismatch` if odd."""
        bucket = self._bucket(now)
        bucket.audits += 1
        bucket.mismatches += bool(mismatch)

    def record_health(self, now: float, ok: bool) -> None:
        """An active health check passed (`ok`) or failed."""
        bucket = self._bucket(now)
        bucket.checks += 1
        bucket.check_failures += not ok

    def record_inflight(self, now: float, n: int) -> None:
        """A sample of this backend's in-flight requests."""
        bucket = self._bucket(now)
        bucket.inflight_sum += n
        bucket.inflight_samples += 1

    def __len__(self) -> int:
        return len(self._buckets)

    def stats(self, now: float) -> WindowStats:
        """Aggregates over the buckets overlapping the last `window_s` seconds."""
        self._expire(now)
        if not self._buckets:
            return WindowStats()
        total = _Counts()
        total.add(self._closed)
        total.add(self._buckets[-1])
        outcomes = total.outcomes
        samples = total.inflight_samples
        quantiles = histogram_quantiles(total.hist, (0.50, 0.95, 0.99))
        return WindowStats(
            requests=sum(outcomes.values()),
            successes=outcomes[Outcome.SUCCESS],
            errors_5xx=outcomes[Outcome.ERROR],
            timeouts=outcomes[Outcome.TIMEOUT],
            connect_errors=outcomes[Outcome.CONNECT_ERROR],
            latency_p50_s=quantiles[0],
            latency_p95_s=quantiles[1],
            latency_p99_s=quantiles[2],
            audits=total.audits,
            audit_mismatches=total.mismatches,
            health_checks=total.checks,
            health_failures=total.check_failures,
            inflight_mean=total.inflight_sum / samples if samples else 0.0,
        )


def _relative(value: float | None, median: float | None) -> float:
    if value is None or not median:
        return 1.0
    return min(REL_CAP, value / median)


def compute_features(stats: Mapping[str, WindowStats]) -> dict[str, dict[str, float]]:
    """Fleet-relative features of every backend in one window (pure; see module docstring)."""
    p50s = [s.latency_p50_s for s in stats.values() if s.latency_p50_s is not None]
    median = float(np.median(p50s)) if p50s else None
    out: dict[str, dict[str, float]] = {}
    for backend, s in stats.items():
        n = s.requests
        out[backend] = {
            "request_count_log1p": math.log1p(n),
            "success_ratio": s.successes / n if n else 1.0,
            "error_5xx_ratio": s.errors_5xx / n if n else 0.0,
            "timeout_ratio": s.timeouts / n if n else 0.0,
            "connect_error_ratio": s.connect_errors / n if n else 0.0,
            "latency_p50_rel": _relative(s.latency_p50_s, median),
            "latency_p95_rel": _relative(s.latency_p95_s, median),
            "latency_p99_rel": _relative(s.latency_p99_s, median),
            "audit_mismatch_ratio": s.audit_mismatches / s.audits if s.audits else 0.0,
            "audit_count_log1p": math.log1p(s.audits),
            "health_fail_ratio": s.health_failures / s.health_checks if s.health_checks else 0.0,
            "inflight_mean": float(s.inflight_mean),
        }
    return out


def feature_vector(
    features: Mapping[str, float], names: tuple[str, ...] = FEATURE_NAMES
) -> list[float]:
    """The features of one backend as a row in `names` order (KeyError names a missing one)."""
    try:
        return [float(features[name]) for name in names]
    except KeyError as err:
        raise KeyError(f"feature {err.args[0]!r} missing (have {sorted(features)})") from None


class FleetWindows:
    """One FeatureWindow per backend, with the fleet's features for the window in one call."""

    def __init__(self, window_s: float, resolution_s: float = 0.25) -> None:
        self.window_s = window_s
        self.resolution_s = resolution_s
        self.windows: dict[str, FeatureWindow] = {}

    def set_backends(self, backends: list[str] | tuple[str, ...]) -> None:
        """Keep windows of known backends, add empty ones, drop removed ones."""
        old = self.windows
        self.windows = {
            b: old[b] if b in old else FeatureWindow(self.window_s, self.resolution_s)
            for b in backends
        }

    def __getitem__(self, backend: str) -> FeatureWindow:
        return self.windows[backend]

    def stats(self, now: float) -> dict[str, WindowStats]:
        return {b: w.stats(now) for b, w in self.windows.items()}

    def features(self, now: float) -> dict[str, dict[str, float]]:
        return compute_features(self.stats(now))
