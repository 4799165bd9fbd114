"""The fleet (sans-IO): one record per backend, and the backends in rotation.

A `BackendRecord` is everything the balancer itself keeps about one backend: its URL, its
upstream connection pool, its counters, its feature window and last feature row, its
in-flight count and whether health keeps it in rotation. The `Fleet` owns the records
(add, remove, look up) in the order the backends joined. The request path looks a
backend up once and reads the rest off the record.

The state machines keep their own per-backend state, keyed by URL, because each is a
sans-IO core driven alone as well (tests, the simulator): health (`health.py`), trust and
evidence (`trust.py`, `evidence.py`), the policy, the gossip verdicts. The balancer
(`core.py`) applies every change of the fleet to all of them at once.

The fleet reads no clock and does no I/O: the pool and the counters are objects of the
IO shell that it only holds (closing a removed backend's pool is the shell's job).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twlb.balancer.features import FeatureWindow, compute_features


class BackendRecord:
    """What the balancer keeps about one backend."""

    __slots__ = ("url", "pool", "counters", "window", "features", "inflight", "up", "in_fleet")

    def __init__(self, url: str, pool: Any, counters: Any, window: FeatureWindow, up: bool) -> None:
        self.url = url
        #: the upstream connection pool that proxied tries and audits go through
        self.pool = pool
        #: its metric counters (plain numbers: tries, durations, audits, rotation events)
        self.counters = counters
        #: its events over the last window (tries, audits, health checks, in-flight samples)
        self.window = window
        #: its feature row at the last trust tick (None before its first)
        self.features: dict[str, float] | None = None
        #: tries sent to it and not ended yet
        self.inflight = 0
        #: in rotation by health (a member of `Fleet.up`)
        self.up = up
        #: False once removed: a try that ends after its backend left feeds nothing
        self.in_fleet = True


class Fleet:
    """The records of every backend, in the order they joined, and the list of those up.

    `urls` and `records` change in place; `up`, which routing reads on every request and
    policies cache against by identity, is a new list at every change and the same list
    while nothing changes.
    """

    def __init__(self, window_s: float, resolution_s: float) -> None:
        self.window_s = window_s
        self.resolution_s = resolution_s
        self.records: dict[str, BackendRecord] = {}
        self.urls: list[str] = []
        self.up: list[str] = []

    def add(self, url: str, pool: Any, counters: Any, *, up: bool = False) -> BackendRecord:
        """A new backend's record with an empty window (ValueError if `url` is in the
        fleet). `up`: whether it starts in `up` (the fleet a balancer starts with does;
        one added later joins at the next `set_up`, as a change of rotation)."""
        if url in self.records:
            raise ValueError(f"backend {url} is already in the fleet")
        rec = BackendRecord(
            url, pool, counters, FeatureWindow(self.window_s, self.resolution_s), up
        )
        self.records[url] = rec
        self.urls.append(url)
        if up:
            self.up = [*self.up, url]
        return rec

    def remove(self, url: str) -> BackendRecord | None:
        """Take a backend's record out of the fleet (None if it is not in it)."""
        rec = self.records.pop(url, None)
        if rec is None:
            return None
        rec.in_fleet = False
        self.urls.remove(url)
        if rec.up:
            self.up = [u for u in self.up if u != url]
        return rec

    def get(self, url: str) -> BackendRecord | None:
        return self.records.get(url)

    def __getitem__(self, url: str) -> BackendRecord:
        return self.records[url]

    def __contains__(self, url: object) -> bool:
        return url in self.records

    def __iter__(self) -> Iterator[BackendRecord]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)

    def set_up(self, up: list[str]) -> tuple[list[str], list[str]]:
        """Put the backends in `up` (fleet order) in rotation and the rest out; returns
        the backends that left and those that joined, in fleet order."""
        if up == self.up:
            return [], []
        now_up = set(up)
        left: list[str] = []
        joined: list[str] = []
        for rec in self.records.values():
            is_up = rec.url in now_up
            if is_up != rec.up:
                rec.up = is_up
                (joined if is_up else left).append(rec.url)
        self.up = up
        return left, joined

    def features(self, now: float) -> dict[str, dict[str, float]]:
        """Every backend's feature row over the window ending at `now`, kept on its record
        (`features.compute_features`: relative latencies are relative to this fleet)."""
        rows = compute_features({rec.url: rec.window.stats(now) for rec in self.records.values()})
        for url, row in rows.items():
            self.records[url].features = row
        return rows

    def sample_inflight(self, now: float) -> None:
        """Record every backend's in-flight count in its window."""
        for rec in self.records.values():
            rec.window.record_inflight(now, rec.inflight)
