"""Routing policies (sans-IO): plain objects fed request events and `now` that pick a backend.

The balancer calls `pick` with the candidates it allows (backends that are up and not yet
tried for this request), `on_start`/`on_end` around every upstream try and `tick`
periodically; the future simulator drives the same objects. They read no clock, do no
I/O, and cost a few microseconds per call. `make_policy` builds one by name.

Policies: round-robin, random (seeded), least-connections (ties in round-robin order),
weighted-round-robin (nginx's smooth WRR, including its effective-weight recovery after
failures), consistent-hash (ring of virtual nodes, sha256 or md5), rendezvous, maglev (a
fixed prime table), jump and bounded-load (consistent hashing with bounded loads; the cores
are in `hashing.py`), p2c-ewma (power of two
choices on peak-EWMA latency times in-flight + 1, as Linkerd and Finagle), outlier-ejection
(Envoy's consecutive-5xx and success-rate ejection), trust (smooth WRR over a TrustEngine's
weights scaled by current peak-EWMA load, ejected backends excluded) and oracle (ground
truth; experiments only).
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from twlb.balancer.hashing import (
    MAGLEV_TABLE_SIZE,
    HashRing,
    JumpSlots,
    MaglevTable,
    bounded_load_place,
    check_algorithm,
    rendezvous_owner,
)
from twlb.balancer.trust import TrustEngine

from twlb.outcome import CONNECT_ERROR, SUCCESS, TIMEOUT, Outcome
from twlb.spec import NodeClass, PolicyName

#: The trust policy's smooth pick weighs every candidate (O(N) a pick); above this many
#: candidates it draws two by weight and takes the less loaded (O(log N); bench/fleet_scale.py).
P2C_ABOVE = 32
#: While a slow-start ramp runs, the trust policy's static weights are this fresh (seconds).
RAMP_REFRESH_S = 0.05


class Policy(Protocol):
    """What the balancer needs from a routing policy."""

    name: PolicyName
    keyed: bool  # routes by the request's key (the balancer then reads ?key= too)

    def set_backends(self, backends: Sequence[str], now: float) -> None: ...

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None: ...

    def on_start(self, backend: str, now: float) -> None: ...

    def on_end(self, backend: str, now: float, outcome: Outcome, latency_s: float) -> None: ...

    def tick(self, now: float) -> None: ...

    def describe(self, backend: str) -> dict: ...


class BasePolicy:
    """Backend list and in-flight counts, shared by every policy."""

    name: PolicyName
    keyed = False

    def __init__(self) -> None:
        self.backends: list[str] = []
        self.inflight: dict[str, int] = {}

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        self.backends = list(backends)
        self.inflight = {b: self.inflight.get(b, 0) for b in self.backends}

    def on_start(self, backend: str, now: float) -> None:
        self.inflight[backend] = self.inflight.get(backend, 0) + 1

    def on_end(self, backend: str, now: float, outcome: Outcome, latency_s: float) -> None:
        n = self.inflight.get(backend)
        if n:  # a backend removed mid-request has no counter left to lower
            self.inflight[backend] = n - 1

    def tick(self, now: float) -> None:
        return None

    def describe(self, backend: str) -> dict:
        return {"inflight": self.inflight.get(backend, 0)}


class Rotation:
    """A turn counter: each `take` returns the next item of the sequence it is given."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def take(self, items: Sequence[str]) -> str | None:
        if not items:
            return None
        i = self._next
        self._next = i + 1
        return items[i % len(items)]


class RoundRobin(BasePolicy):
    """Each pick takes the next candidate in turn."""

    name = PolicyName.ROUND_ROBIN

    def __init__(self) -> None:
        super().__init__()
        self._turn = Rotation()

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        return self._turn.take(candidates)


class RandomChoice(BasePolicy):
    """A uniformly random candidate, from a seeded generator (same seed, same picks)."""

    name = PolicyName.RANDOM

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        if not candidates:
            return None
        return candidates[self._rng.randrange(len(candidates))]


class LeastConnections(BasePolicy):
    """The candidate with the fewest requests in flight; ties taken in round-robin order."""

    name = PolicyName.LEAST_CONNECTIONS

    def __init__(self) -> None:
        super().__init__()
        self._turn = Rotation()

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        if not candidates:
            return None
        inflight = self.inflight
        fewest = min(inflight.get(b, 0) for b in candidates)
        return self._turn.take([b for b in candidates if inflight.get(b, 0) == fewest])


def smooth_weighted_pick(
    candidates: Sequence[str],
    weights: Mapping[str, float],
    current: dict[str, float],
    floor: float = 0.0,
) -> str | None:
    """nginx's smooth weighted round robin: current += weight, take the max, subtract the total.

    `current` carries each backend's current weight between picks; candidates without an
    entry in `weights` are skipped; weights under `floor` count as `floor`; ties go to the
    first candidate.
    """
    best: str | None = None
    best_current = -math.inf
    total = 0.0
    for b in candidates:
        w = weights.get(b)
        if w is None:
            continue
        if w < floor:
            w = floor
        c = current.get(b, 0.0) + w
        current[b] = c
        total += w
        if c > best_current:
            best, best_current = b, c
    if best is not None:
        current[best] = best_current - total
    return best


class WeightedRoundRobin(BasePolicy):
    """Smooth weighted round robin exactly as nginx (ngx_http_upstream_round_robin.c).

    Backends without a configured weight weigh 1. A failed try (connection error or
    timeout, nginx's default `proxy_next_upstream` failures) lowers the backend's effective
    weight by weight / max_fails (floored at 0); each pick in which it takes part raises it
    by one, back up to its configured weight.
    """

    name = PolicyName.WEIGHTED_ROUND_ROBIN

    def __init__(self, weights: Mapping[str, float] | None = None, max_fails: int = 1) -> None:
        super().__init__()
        if max_fails < 1:
            raise ValueError(f"max_fails must be at least 1, got {max_fails}")
        for b, w in (weights or {}).items():
            if not w > 0:
                raise ValueError(f"weight of {b} must be positive, got {w}")
        self.configured = dict(weights or {})
        self.max_fails = max_fails
        self.weights: dict[str, float] = {}
        self.effective: dict[str, float] = {}
        self.current: dict[str, float] = {}
        self._recovering: set[str] = set()  # effective weight below the configured one

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.weights = {b: self.configured.get(b, 1) for b in self.backends}
        self.effective = {b: self.effective.get(b, w) for b, w in self.weights.items()}
        self.current = {b: self.current.get(b, 0) for b in self.backends}
        self._recovering = {b for b in self._recovering if b in self.weights}

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        chosen = smooth_weighted_pick(candidates, self.effective, self.current)
        if self._recovering:
            effective, weights = self.effective, self.weights
            for b in candidates:
                if b in self._recovering:
                    effective[b] += 1
                    if effective[b] >= weights[b]:
                        effective[b] = weights[b]
                        self._recovering.discard(b)
        return chosen

    def on_end(self, backend: str, now: float, outcome: Outcome, latency_s: float) -> None:
        super().on_end(backend, now, outcome, latency_s)
        if (outcome is CONNECT_ERROR or outcome is TIMEOUT) and (backend in self.weights):
            weight = self.weights[backend]
            self.effective[backend] = max(0, self.effective[backend] - weight / self.max_fails)
            self._recovering.add(backend)

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {
            "weight": self.weights.get(backend),
            "effective_weight": self.effective.get(backend),
            "current_weight": self.current.get(backend),
        }


class KeyedPolicy(BasePolicy):
    """A policy that routes by the request's key (`X-TWLB-Key` or `?key=`); requests without
    a key, or whose key maps to no candidate, are spread round-robin."""

    keyed = True

    def __init__(self) -> None:
        super().__init__()
        self._fallback = Rotation()

    def owner(self, key: str, candidates: Sequence[str]) -> str | None:
        raise NotImplementedError

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        if not candidates:
            return None
        if key is not None:
            chosen = self.owner(key, candidates)
            if chosen is not None:
                return chosen
        return self._fallback.take(candidates)


class ConsistentHash(KeyedPolicy):
    """A hash ring with `vnodes` virtual nodes per backend, keyed by the request key.

    A key maps to the first virtual node clockwise from its hash whose backend is among the
    candidates, so a backend leaving moves only its own keys and one joining takes about
    1/N of them. The ring is `hashing.HashRing`, the one the replicated hash table uses.
    """

    name = PolicyName.CONSISTENT_HASH

    def __init__(self, hash_algorithm: str = "sha256", vnodes: int = 160) -> None:
        super().__init__()
        self.ring = HashRing(vnodes, hash_algorithm)
        self.hash_algorithm = hash_algorithm
        self.vnodes = vnodes

    def hash(self, text: str) -> int:
        """Position of `text` on the ring (the first 8 bytes of its digest)."""
        return self.ring.hash(text)

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.ring.set_nodes(self.backends)

    def owner(self, key: str, candidates: Sequence[str] | None = None) -> str | None:
        """The backend owning `key` among `candidates` (default: all backends)."""
        return self.ring.owner(key, candidates)

    def describe(self, backend: str) -> dict:
        share = self.ring.shares().get(backend, 0.0)
        return super().describe(backend) | {"ring_share": round(share, 6), "vnodes": self.vnodes}


class Rendezvous(KeyedPolicy):
    """Rendezvous (highest random weight) hashing over the candidates: no ring, and a
    backend leaving moves only its own keys."""

    name = PolicyName.RENDEZVOUS

    def __init__(self, hash_algorithm: str = "sha256") -> None:
        super().__init__()
        check_algorithm(hash_algorithm)
        self.hash_algorithm = hash_algorithm

    def owner(self, key: str, candidates: Sequence[str]) -> str | None:
        return rendezvous_owner(key, candidates, self.hash_algorithm)


class Maglev(KeyedPolicy):
    """Maglev hashing: a lookup table of a fixed prime size (65,537 unless told otherwise)
    filled from each backend's permutation, rebuilt when the backends change (a join or a
    leave moves about 1/N of the keys). A key whose backend is not a candidate (down, or
    tried already) goes to the next slot's backend that is; no other key moves."""

    name = PolicyName.MAGLEV

    def __init__(self, hash_algorithm: str = "sha256", table_size: int = MAGLEV_TABLE_SIZE) -> None:
        super().__init__()
        self.table = MaglevTable(hash_algorithm, table_size)

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.table.set_nodes(self.backends)

    def owner(self, key: str, candidates: Sequence[str]) -> str | None:
        return self.table.owner(key, candidates)

    def describe(self, backend: str) -> dict:
        t = self.table.table
        share = t.count(backend) / len(t) if t else 0.0
        return super().describe(backend) | {
            "table_share": round(share, 6),
            "table_size": self.table.size,
        }


class Jump(KeyedPolicy):
    """Jump consistent hashing: each backend keeps a bucket for as long as it stays (a
    leaver leaves a hole, a joiner takes the first hole), so a join or a leave anywhere in
    the list moves about 1/N of the keys. A key whose bucket is a hole or a backend that is
    not a candidate draws again with the next hash of its key."""

    name = PolicyName.JUMP

    def __init__(self, hash_algorithm: str = "sha256") -> None:
        super().__init__()
        self.slots = JumpSlots(hash_algorithm)

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.slots.set_nodes(self.backends)

    def owner(self, key: str, candidates: Sequence[str]) -> str | None:
        return self.slots.owner(key, candidates)

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {
            "bucket": self.slots.bucket(backend),
            "buckets": len(self.slots.slots),
        }


class BoundedLoad(ConsistentHash):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam; HAProxy's
    `hash-balance-factor`), on requests in flight.

    A key goes to its own backend on the ring whenever that backend's requests in flight
    are under the capacity ceil(c x (L + 1) / N), L the requests in flight over the
    candidates, N their number; else to the next backend clockwise that is under it. So
    a key stays on its backend while that backend has room, and at every placement the
    chosen backend ends up carrying at most the capacity (under c x mean + 1). With few
    requests in flight the capacity is 1 or 2, so two requests whose keys share a backend
    already spill; the share of keys that spill falls as the load grows.

    Counted for `/trust`: placements, how many left their own backend (spills), and the
    most the chosen backend carried after a placement over the capacity then
    (`worst_load_over_bound`, at most 1 by construction; the tests check it against
    the requests really in flight).
    """

    name = PolicyName.BOUNDED_LOAD

    def __init__(
        self, hash_algorithm: str = "sha256", vnodes: int = 160, balance_factor: float = 1.25
    ) -> None:
        super().__init__(hash_algorithm, vnodes)
        if not balance_factor >= 1.0:
            raise ValueError(f"balance_factor must be at least 1, got {balance_factor}")
        self.balance_factor = balance_factor
        self.placements = 0
        self.spills = 0
        self.worst_load_over_bound = 0.0

    def owner(self, key: str, candidates: Sequence[str] | None = None) -> str | None:
        placed = bounded_load_place(self.ring, key, self.inflight, self.balance_factor, candidates)
        if placed is None:
            return None
        self.placements += 1
        if placed.node != placed.home:
            self.spills += 1
        ratio = (placed.load + 1) / placed.bound
        if ratio > self.worst_load_over_bound:
            self.worst_load_over_bound = ratio
        return placed.node

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {
            "balance_factor": self.balance_factor,
            "placements": self.placements,
            "spills": self.spills,
            "worst_load_over_bound": round(self.worst_load_over_bound, 4),
        }


class PeakEwma(BasePolicy):
    """Power of two choices on peak-EWMA latency times (in-flight + 1), as Linkerd and Finagle.

    The cost of a backend jumps up at once to a slower sample and otherwise decays towards
    newer samples (and towards zero while idle) with time constant `decay_s`. A failed try
    counts as at least `failure_penalty_s` of latency. New backends start at `default_rtt_s`.
    """

    name = PolicyName.P2C_EWMA

    def __init__(
        self,
        seed: int = 0,
        decay_s: float = 10.0,
        default_rtt_s: float = 0.03,
        failure_penalty_s: float = 1.0,
    ) -> None:
        super().__init__()
        if decay_s <= 0 or default_rtt_s < 0 or failure_penalty_s < 0:
            raise ValueError("need decay_s > 0, default_rtt_s >= 0, failure_penalty_s >= 0")
        self._rng = random.Random(seed)
        self.decay_s = decay_s
        self.default_rtt_s = default_rtt_s
        self.failure_penalty_s = failure_penalty_s
        self.cost: dict[str, float] = {}
        self.stamp: dict[str, float] = {}

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.cost = {b: self.cost.get(b, self.default_rtt_s) for b in self.backends}
        self.stamp = {b: self.stamp.get(b, now) for b in self.backends}

    def loads(self, backends: Iterable[str], now: float) -> list[float]:
        """Each backend's cost decayed to `now`, times its in-flight tries + 1 (one call
        for all the candidates of a pick: it runs on every request)."""
        cost, stamp, inflight = self.cost, self.stamp, self.inflight
        default, decay_s, exp = self.default_rtt_s, self.decay_s, math.exp
        out = []
        for b in backends:
            c = cost.get(b, default)
            elapsed = now - stamp.get(b, now)
            if elapsed > 0:
                c *= exp(-elapsed / decay_s)
            out.append(c * (inflight.get(b, 0) + 1))
        return out

    def load(self, backend: str, now: float) -> float:
        return self.loads((backend,), now)[0]

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        load_a, load_b = self.loads((a, b), now)
        return a if load_a <= load_b else b

    def on_end(self, backend: str, now: float, outcome: Outcome, latency_s: float) -> None:
        super().on_end(backend, now, outcome, latency_s)
        if backend not in self.cost:
            return
        rtt = latency_s if outcome is SUCCESS else max(latency_s, self.failure_penalty_s)
        cost = self.cost[backend]
        if rtt > cost:
            self.cost[backend] = rtt
        else:
            elapsed = max(0.0, now - self.stamp[backend])
            decay = math.exp(-elapsed / self.decay_s)
            self.cost[backend] = cost * decay + rtt * (1.0 - decay)
        self.stamp[backend] = now

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {"ewma_s": self.cost.get(backend, self.default_rtt_s)}


class _HostOutlier:
    __slots__ = (
        "consecutive_5xx",
        "ok",
        "total",
        "ejected_at",
        "unejected_at",
        "backoff",
        "ejections",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.ok = 0  # successes in the current interval
        self.total = 0  # tries in the current interval
        self.ejected_at: float | None = None
        self.unejected_at: float | None = None
        self.backoff = 0  # Envoy's ejection time multiplier
        self.ejections = 0  # lifetime count, for describe()


class OutlierEjection(BasePolicy):
    """Round robin over backends not ejected by Envoy-style outlier detection.

    As Envoy's outlier detection (with split_external_local_origin_errors off, so
    timeouts and connection errors count as 5xx):
    - `consecutive_5xx` failures in a row eject a backend at once;
    - every `interval_s`, among backends with at least `success_rate_request_volume`
      tries in the interval, if there are at least `success_rate_minimum_hosts` of them,
      those whose success rate is below mean - `success_rate_stdev_factor` * stdev are
      ejected;
    - an ejection lasts `base_ejection_time_s` times the ejection multiplier (incremented
      per ejection, decremented at each interval the backend spends un-ejected), capped
      at `max_ejection_time_s`; unejection is checked at every tick;
    - at most `max_ejection_percent` of the backends are ejected at once, though one may
      always be. Envoy defaults to 10 %, which on a 6-node fleet never allows a second
      ejection; 50 is the default here so half of a small fleet can be taken out.
    """

    name = PolicyName.OUTLIER_EJECTION

    def __init__(
        self,
        consecutive_5xx: int = 5,
        interval_s: float = 10.0,
        base_ejection_time_s: float = 30.0,
        max_ejection_time_s: float = 300.0,
        max_ejection_percent: float = 50.0,
        success_rate_minimum_hosts: int = 5,
        success_rate_request_volume: int = 100,
        success_rate_stdev_factor: float = 1.9,
    ) -> None:
        super().__init__()
        if consecutive_5xx < 1 or interval_s <= 0 or base_ejection_time_s <= 0:
            raise ValueError("need consecutive_5xx >= 1, interval_s > 0, base_ejection_time_s > 0")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be in 0..100, got {max_ejection_percent}")
        self.consecutive_5xx = consecutive_5xx
        self.interval_s = interval_s
        self.base_ejection_time_s = base_ejection_time_s
        self.max_ejection_time_s = max(max_ejection_time_s, base_ejection_time_s)
        self.max_ejection_percent = max_ejection_percent
        self.success_rate_minimum_hosts = success_rate_minimum_hosts
        self.success_rate_request_volume = success_rate_request_volume
        self.success_rate_stdev_factor = success_rate_stdev_factor
        self.hosts: dict[str, _HostOutlier] = {}
        self._turn = Rotation()
        self._interval_start: float | None = None

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.hosts = {b: self.hosts.get(b, None) or _HostOutlier() for b in self.backends}
        if self._interval_start is None:
            self._interval_start = now

    def is_ejected(self, backend: str) -> bool:
        h = self.hosts.get(backend)
        return h is not None and h.ejected_at is not None

    def ejected_count(self) -> int:
        return sum(h.ejected_at is not None for h in self.hosts.values())

    def ejection_time(self, backend: str) -> float:
        """How long `backend`'s current ejection lasts, seconds."""
        h = self.hosts[backend]
        return min(self.base_ejection_time_s * max(1, h.backoff), self.max_ejection_time_s)

    def _eject(self, backend: str, now: float) -> bool:
        h = self.hosts[backend]
        if h.ejected_at is not None:
            return False
        ejected = self.ejected_count()
        share = 100.0 * (ejected + 1) / len(self.hosts)
        if ejected > 0 and share > self.max_ejection_percent:
            return False
        h.ejected_at = now
        h.ejections += 1
        if self.base_ejection_time_s * h.backoff < self.max_ejection_time_s:
            h.backoff += 1
        return True

    def _uneject(self, h: _HostOutlier, now: float) -> None:
        h.ejected_at = None
        h.unejected_at = now
        h.consecutive_5xx = 0
        h.ok = h.total = 0

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        hosts = self.hosts
        return self._turn.take(
            [b for b in candidates if b not in hosts or hosts[b].ejected_at is None]
        )

    def on_end(self, backend: str, now: float, outcome: Outcome, latency_s: float) -> None:
        super().on_end(backend, now, outcome, latency_s)
        h = self.hosts.get(backend)
        if h is None:
            return
        h.total += 1
        if outcome is SUCCESS:
            h.ok += 1
            h.consecutive_5xx = 0
            return
        h.consecutive_5xx += 1
        if h.consecutive_5xx >= self.consecutive_5xx:
            self._eject(backend, now)
            h.consecutive_5xx = 0

    def tick(self, now: float) -> None:
        for backend, h in self.hosts.items():
            if h.ejected_at is not None and now - h.ejected_at >= self.ejection_time(backend):
                self._uneject(h, now)
        if self._interval_start is None:
            self._interval_start = now
        if now - self._interval_start >= self.interval_s:
            self._end_interval(now)
            self._interval_start = now

    def _end_interval(self, now: float) -> None:
        start = self._interval_start
        for h in self.hosts.values():
            # Only a whole interval spent un-ejected earns a lower multiplier.
            whole = h.unejected_at is None or (start is not None and h.unejected_at <= start)
            if h.ejected_at is None and h.backoff > 0 and whole:
                h.backoff -= 1
        rates = {
            b: h.ok / h.total
            for b, h in self.hosts.items()
            if h.ejected_at is None and h.total >= self.success_rate_request_volume
        }
        if len(rates) >= self.success_rate_minimum_hosts:
            mean = statistics.fmean(rates.values())
            threshold = mean - self.success_rate_stdev_factor * statistics.pstdev(rates.values())
            for b in sorted(rates, key=rates.__getitem__):
                if rates[b] < threshold:
                    self._eject(b, now)
        for h in self.hosts.values():
            h.ok = h.total = 0

    def describe(self, backend: str) -> dict:
        h = self.hosts.get(backend)
        if h is None:
            return super().describe(backend)
        return super().describe(backend) | {
            "ejected": h.ejected_at is not None,
            "ejected_at": h.ejected_at,
            "ejections": h.ejections,
            "ejection_multiplier": h.backoff,
            "consecutive_5xx": h.consecutive_5xx,
        }


class TrustWeighted(PeakEwma):
    """Smooth WRR over the trust engine's weights, each scaled by how fast the backend is
    answering now; backends the engine has ejected are skipped.

    Trust decides who may serve and how much: it is the only signal that sees wrong
    answers, but it moves once per scored window. Latency decides the moment-to-moment
    share: a backend's weight is multiplied by `best_load / its_load` over the candidates,
    where load is peak-EWMA latency times (in-flight + 1) as in p2c-ewma, so a backend that
    starts answering slowly (or not at all) loses its share within a few requests, when its
    in-flight count piles up, long before a window scores it. With equal loads the shares
    are the trust weights exactly. `latency_weighting=False` routes on trust alone.

    Slow start, as Envoy's: a backend in PROBATION (new, or back after an ejection) gets
    its weight ramped from `slow_start_floor` of it up to all of it over `slow_start_s`
    after entering probation, so a backend that is still bad when it comes back meets
    little traffic before the audits see it again (0 turns this off).

    A backend that is not ejected always keeps at least `min_weight`, so a low but
    un-ejected weight still gets a trickle of traffic (and so, fresh evidence). Only
    backends the engine knows are routed: the server gives the engine the same backend
    list as the policy.
    """

    name = PolicyName.TRUST

    def __init__(
        self,
        trust_engine: TrustEngine,
        min_weight: float = 0.01,
        latency_weighting: bool = True,
        slow_start_s: float = 5.0,
        slow_start_floor: float = 0.1,
        seed: int = 0,
        decay_s: float = 1.0,
        default_rtt_s: float = 0.03,
        failure_penalty_s: float = 1.0,
    ) -> None:
        super().__init__(seed, decay_s, default_rtt_s, failure_penalty_s)
        if not 0.0 <= min_weight <= 1.0:
            raise ValueError(f"min_weight must be in [0, 1], got {min_weight}")
        if slow_start_s < 0 or not 0.0 < slow_start_floor <= 1.0:
            raise ValueError(
                f"need slow_start_s >= 0 and 0 < slow_start_floor <= 1, got {slow_start_s}, "
                f"{slow_start_floor}"
            )
        self.engine = trust_engine
        self.slow_start_s = slow_start_s
        self.slow_start_floor = slow_start_floor
        self.min_weight = min_weight
        self.latency_weighting = latency_weighting
        self.current: dict[str, float] = {}
        self._static: dict[str, float] = {}
        self._static_of: dict[str, float] | None = None
        # (candidates, static weights, their admitted weights, the admitted names)
        self._candidate_weights: tuple[Sequence[str], dict, dict, tuple] | None = None
        self._static_at = -math.inf
        self._ramping = False
        self._sampler: tuple[Sequence[str], list[str], list[float]] | None = None

    def set_backends(self, backends: Sequence[str], now: float) -> None:
        super().set_backends(backends, now)
        self.current = {b: self.current.get(b, 0.0) for b in self.backends}

    def ramp(self, backend: str, now: float) -> float:
        """The slow-start factor: 1 unless `backend` entered PROBATION under
        `slow_start_s` ago."""
        since = self.engine.probation.get(backend) if self.slow_start_s else None
        if since is None:
            return 1.0
        return max(self.slow_start_floor, min(1.0, (now - since) / self.slow_start_s))

    def static_weights(self, now: float) -> dict[str, float]:
        """Trust weight times slow-start ramp (relative to the most advanced admitted
        backend's: a fleet starting up together ramps together), for every admitted
        backend. Rebuilt when the engine publishes new weights or states (each change is a
        new `admitted` mapping) and, while a ramp runs, every `RAMP_REFRESH_S`; so a pick
        reads one mapping instead of asking the engine about every candidate."""
        admitted = self.engine.admitted
        if admitted is self._static_of and not (
            self._ramping and now - self._static_at >= RAMP_REFRESH_S
        ):
            return self._static
        probation = self.engine.probation if self.slow_start_s else {}
        ramps = {b: self.ramp(b, now) for b in probation if b in admitted}
        top = max(ramps.values(), default=1.0) if len(ramps) == len(admitted) else 1.0
        self._static = {b: w * ramps.get(b, 1.0) / top for b, w in admitted.items()}
        self._static_of, self._static_at = admitted, now
        self._ramping = any(r < 1.0 for r in ramps.values())
        self._sampler = None
        return self._static

    def effective_weights(self, candidates: Sequence[str], now: float) -> dict[str, float]:
        """The static weight of each admitted candidate times best load / own load."""
        static = self.static_weights(now)
        # The admitted candidates' static weights, kept while the candidate list and the
        # static weights are the same objects (each change builds new ones).
        kept = self._candidate_weights
        if kept is None or kept[0] is not candidates or kept[1] is not static:
            admitted = {b: static[b] for b in candidates if b in static}
            kept = (candidates, static, admitted, tuple(admitted))
            self._candidate_weights = kept
        weights = dict(kept[2])  # a copy: latency weighting scales it
        if not self.latency_weighting or len(weights) < 2:
            return weights
        names = kept[3]
        loads = self.loads(names, now)
        best = min(loads)
        for i, ld in enumerate(loads):
            if ld > best:
                b = names[i]
                weights[b] = weights[b] * best / ld
        return weights

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        if len(candidates) > P2C_ABOVE:
            return self._pick_two(candidates, now)
        return smooth_weighted_pick(
            candidates, self.effective_weights(candidates, now), self.current, self.min_weight
        )

    def _pick_two(self, candidates: Sequence[str], now: float) -> str | None:
        """A large fleet: two candidates drawn with probability proportional to their static
        weight (at least `min_weight`), the less loaded one taken (power of two choices, as
        Finagle and Envoy balance large fleets). With equal loads each draw wins half the
        time, so the shares are the static weights; a backend whose requests pile up loses
        its share as in the smooth pick. O(log N) per pick: the draw table is built once per
        candidate list and weight change, not per pick."""
        static = self.static_weights(now)
        sampler = self._sampler
        if sampler is None or sampler[0] is not candidates:
            chosen = [b for b in candidates if b in static]
            floor = self.min_weight
            sampler = (candidates, chosen, list(itertools.accumulate(
                max(floor, static[b]) for b in chosen
            )))  # fmt: skip
            self._sampler = sampler
        _, chosen, cumulative = sampler
        if not chosen:
            return None
        total = cumulative[-1]
        if total <= 0.0:
            return chosen[self._rng.randrange(len(chosen))]
        rand = self._rng.random
        last = len(chosen) - 1
        a = chosen[min(last, bisect.bisect_right(cumulative, rand() * total))]
        if not self.latency_weighting or len(chosen) == 1:
            return a
        b = chosen[min(last, bisect.bisect_right(cumulative, rand() * total))]
        load_a, load_b = self.loads((a, b), now)
        return a if load_a <= load_b else b

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {
            "weight": self.engine.weight(backend),
            "state": self.engine.state(backend).value,
        }


class Oracle(BasePolicy):
    """Round robin over the candidates whose ground truth is healthy (experiments only)."""

    name = PolicyName.ORACLE

    def __init__(self, truth: Callable[[str], NodeClass]) -> None:
        super().__init__()
        self.truth = truth
        self._turn = Rotation()

    def pick(self, candidates: Sequence[str], now: float, key: str | None = None) -> str | None:
        return self._turn.take([b for b in candidates if self.truth(b) == NodeClass.HEALTHY])

    def describe(self, backend: str) -> dict:
        return super().describe(backend) | {"truth": str(self.truth(backend))}


POLICIES: dict[PolicyName, type[BasePolicy]] = {
    PolicyName.ROUND_ROBIN: RoundRobin,
    PolicyName.RANDOM: RandomChoice,
    PolicyName.LEAST_CONNECTIONS: LeastConnections,
    PolicyName.WEIGHTED_ROUND_ROBIN: WeightedRoundRobin,
    PolicyName.CONSISTENT_HASH: ConsistentHash,
    PolicyName.RENDEZVOUS: Rendezvous,
    PolicyName.MAGLEV: Maglev,
    PolicyName.JUMP: Jump,
    PolicyName.BOUNDED_LOAD: BoundedLoad,
    PolicyName.P2C_EWMA: PeakEwma,
    PolicyName.OUTLIER_EJECTION: OutlierEjection,
    PolicyName.TRUST: TrustWeighted,
    PolicyName.ORACLE: Oracle,
}


def parse_policy_name(name: PolicyName | str) -> PolicyName:
    """The PolicyName for `name`, or ValueError listing the known ones."""
    try:
        return PolicyName(name)
    except ValueError:
        known = ", ".join(p.value for p in PolicyName)
        raise ValueError(f"unknown policy {name!r}; choose one of {known}") from None


def make_policy(
    name: PolicyName | str,
    *,
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
    hash_algorithm: str = "sha256",
    vnodes: int = 160,
    balance_factor: float | None = None,
    maglev_table_size: int | None = None,
    trust_engine: TrustEngine | None = None,
    truth: Callable[[str], NodeClass] | None = None,
    latency_weighting: bool | None = None,
    slow_start_s: float | None = None,
    **options: Any,
) -> Policy:
    """Build the policy called `name`. The named settings go to the policies that take them
    (None: the policy's default); `options` are the policy's own tunables (ValueError if
    unknown)."""
    policy = parse_policy_name(name)
    if policy is PolicyName.TRUST and trust_engine is None:
        raise ValueError("policy 'trust' needs a trust_engine")
    if policy is PolicyName.ORACLE and truth is None:
        raise ValueError("policy 'oracle' needs the ground truth (truth=...)")
    cls = POLICIES[policy]
    common = {
        "seed": seed,
        "weights": weights,
        "hash_algorithm": hash_algorithm,
        "vnodes": vnodes,
        "balance_factor": balance_factor,
        "table_size": maglev_table_size,
        "trust_engine": trust_engine,
        "truth": truth,
        "latency_weighting": latency_weighting,
        "slow_start_s": slow_start_s,
    }
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        own = sorted(set(params) - {"self"} - set(common))
        raise ValueError(f"policy {policy.value!r} has no option {unknown}; its options: {own}")
    kwargs = {k: v for k, v in common.items() if k in params and v is not None} | options
    return cls(**kwargs)
