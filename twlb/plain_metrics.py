"""Lock-free metric values for services that update them on one event-loop thread.

prometheus-client's Counter and Histogram take a lock and look up a child per update;
on a hot path run by a single event loop that buys nothing. Services keep plain
numbers instead (ints, and `PlainHistogram` here) and render them as metric families
from a registered collector at scrape time; prometheus-client still writes the
exposition.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client.utils import floatToGoString


class PlainHistogram:
    """Bucket counts and a sum, updated without locks; `le` bounds are inclusive as in Prometheus."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing, got {bounds}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative_buckets(self) -> list[tuple[str, float]]:
        """`(le, count)` pairs as `HistogramMetricFamily.add_metric` takes them."""
        buckets, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))
        return buckets
