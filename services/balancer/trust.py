"""The trust engine (sans-IO): turns each tick's features into a trust weight per backend.

Every `update(features, now)` scores all backends in one batched `predict_proba` call and
smooths each backend's P(healthy) into its weight with an EWMA (`smoothing` is alpha per
tick). The weight then drives an explicit state machine (`TRANSITIONS`):

- new backends start in PROBATION at `probation_weight`, a moderate share of traffic;
- a weight at or above `readmit_above` makes a backend TRUSTED; below `eject_below` it is
  EJECTED (hysteresis: between the two, a backend keeps its state);
- the floor: never more than `max_ejected_fraction` of the fleet is ejected at once, so a
  bad model cannot black-hole traffic; when more want out, the worst go first and the
  rest stay in (LOW_HELD);
- absence of traffic is evidence of neither health nor sickness: with fewer than
  `min_samples` requests plus audits in the window a backend's weight holds, and may only
  fall on evidence that needs no traffic (failed health checks, connection errors,
  timeouts); so an ejected backend is not readmitted merely because nobody talks to it,
  and a fleet that has not seen traffic yet is not ejected at start-up;
- like Envoy's outlier ejection, an ejected backend gets another chance in PROBATION after
  `ejection_base_s` times the number of consecutive ejections (capped at
  `max_ejection_s`), with its weight reset to `probation_weight`; reaching TRUSTED clears
  the count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from twlb.balancer.features import FEATURE_NAMES
from twlb.balancer.scoring import Scorer

from twlb.spec import NodeClass

#: Features that show a backend failing even without traffic; without enough samples
#: only these may lower its weight (a quiet backend is not a sick one).
FAILURE_EVIDENCE = ("health_fail_ratio", "connect_error_ratio", "timeout_ratio")

#: Requests plus audits a window needs before its score may move a weight either way.
MIN_SAMPLES = 5


def window_samples(features: Mapping[str, float]) -> float:
    """Requests plus audits behind one backend's feature window."""
    return math.expm1(features.get("request_count_log1p", 0.0)) + math.expm1(
        features.get("audit_count_log1p", 0.0)
    )


def shows_failure(features: Mapping[str, float]) -> bool:
    """Whether a window shows failure that needs no traffic to be seen."""
    return any(features.get(k, 0.0) > 0.0 for k in FAILURE_EVIDENCE)


def has_samples(features: Mapping[str, float], min_samples: int = MIN_SAMPLES) -> bool:
    """Whether a window rests on enough requests plus audits for its score to move a weight
    either way."""
    return window_samples(features) + 1e-9 >= min_samples


def is_evidence(features: Mapping[str, float], min_samples: int = MIN_SAMPLES) -> bool:
    """Whether the engine acts on a window's score at all: enough samples, or failure that
    needs none. Training keeps only such windows: a window the engine ignores (an ejected
    node nobody talks to) carries no sign of its class, and learning from it teaches the
    model that a quiet healthy node looks faulty."""
    return has_samples(features, min_samples) or shows_failure(features)


class TrustState(StrEnum):
    PROBATION = "probation"
    TRUSTED = "trusted"
    EJECTED = "ejected"


class TrustEvent(StrEnum):
    HIGH = "high"  # weight >= readmit_above
    MID = "mid"  # eject_below <= weight < readmit_above
    LOW = "low"  # weight < eject_below and the floor allows an ejection
    LOW_HELD = "low_held"  # weight < eject_below but the floor forbids ejecting it
    RETRY_DUE = "retry_due"  # an ejection's time is over


_P, _T, _E = TrustState.PROBATION, TrustState.TRUSTED, TrustState.EJECTED

#: (state, event) -> next state, for every pair.
TRANSITIONS: dict[tuple[TrustState, TrustEvent], TrustState] = {
    (_P, TrustEvent.HIGH): _T,
    (_P, TrustEvent.MID): _P,
    (_P, TrustEvent.LOW): _E,
    (_P, TrustEvent.LOW_HELD): _P,
    (_P, TrustEvent.RETRY_DUE): _P,
    (_T, TrustEvent.HIGH): _T,
    (_T, TrustEvent.MID): _T,
    (_T, TrustEvent.LOW): _E,
    (_T, TrustEvent.LOW_HELD): _T,
    (_T, TrustEvent.RETRY_DUE): _T,
    (_E, TrustEvent.HIGH): _T,
    (_E, TrustEvent.MID): _E,
    (_E, TrustEvent.LOW): _E,
    (_E, TrustEvent.LOW_HELD): _E,
    (_E, TrustEvent.RETRY_DUE): _P,
}


@dataclass
class BackendTrust:
    """What the engine knows about one backend."""

    weight: float
    state: TrustState = TrustState.PROBATION
    probabilities: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)
    ejections: int = 0  # consecutive ejections (the back-off multiplier)
    ejected_at: float | None = None
    since: float = 0.0


class TrustEngine:
    """Trust weights and states of every backend; fed features and `now`, reads no clock."""

    def __init__(
        self,
        scorer: Scorer,
        *,
        smoothing: float = 0.5,
        eject_below: float = 0.3,
        readmit_above: float = 0.7,
        max_ejected_fraction: float = 0.5,
        min_samples: int = MIN_SAMPLES,
        probation_weight: float = 0.5,
        ejection_base_s: float = 30.0,
        max_ejection_s: float = 300.0,
    ) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if not 0.0 <= eject_below < readmit_above <= 1.0:
            raise ValueError(
                f"need 0 <= eject_below < readmit_above <= 1, got {eject_below}, {readmit_above}"
            )
        if not 0.0 <= max_ejected_fraction <= 1.0:
            raise ValueError(f"max_ejected_fraction must be in [0, 1], got {max_ejected_fraction}")
        if not 0.0 <= probation_weight <= 1.0:
            raise ValueError(f"probation_weight must be in [0, 1], got {probation_weight}")
        if min_samples < 0 or ejection_base_s <= 0 or max_ejection_s < ejection_base_s:
            raise ValueError(
                "need min_samples >= 0 and 0 < ejection_base_s <= max_ejection_s, got "
                f"{min_samples}, {ejection_base_s}, {max_ejection_s}"
            )
        self.smoothing = smoothing
        self.eject_below = eject_below
        self.readmit_above = readmit_above
        self.max_ejected_fraction = max_ejected_fraction
        self.min_samples = min_samples
        self.probation_weight = probation_weight
        self.ejection_base_s = ejection_base_s
        self.max_ejection_s = max_ejection_s
        self._backends: dict[str, BackendTrust] = {}
        #: weight of every backend that is not ejected (what routing reads on each pick)
        self.admitted: dict[str, float] = {}
        self.set_scorer(scorer)

    # -- configuration -------------------------------------------------------------------

    def set_scorer(self, scorer: Scorer) -> None:
        """Hot-swap the scorer; weights and states carry over."""
        classes = tuple(scorer.classes)
        if NodeClass.HEALTHY.value not in classes:
            raise ValueError(f"scorer classes {list(classes)} lack 'healthy'")
        unknown = [n for n in scorer.feature_names if n not in FEATURE_NAMES]
        if unknown:
            raise ValueError(f"scorer needs features the balancer does not compute: {unknown}")
        self.scorer = scorer
        self._healthy_col = classes.index(NodeClass.HEALTHY.value)

    def set_backends(self, backends: Iterable[str], now: float) -> None:
        """The full backend list: known ones keep their trust, new ones start in PROBATION."""
        old = self._backends
        self._backends = {
            b: old[b] if b in old else BackendTrust(weight=self.probation_weight, since=now)
            for b in backends
        }
        self._refresh()

    def _refresh(self) -> None:
        self.admitted = {
            url: b.weight for url, b in self._backends.items() if b.state is not TrustState.EJECTED
        }

    # -- reading -------------------------------------------------------------------------

    def weight(self, backend: str) -> float:
        b = self._backends.get(backend)
        return self.probation_weight if b is None else b.weight

    def state(self, backend: str) -> TrustState:
        b = self._backends.get(backend)
        return TrustState.PROBATION if b is None else b.state

    def probation_since(self, backend: str) -> float | None:
        """When `backend` entered PROBATION; None when it is not in probation (or unknown)."""
        b = self._backends.get(backend)
        return b.since if b is not None and b.state is TrustState.PROBATION else None

    def is_held(self, backend: str) -> bool:
        """Below the ejection threshold, but kept in rotation by the floor."""
        b = self._backends.get(backend)
        return b is not None and b.state is not TrustState.EJECTED and b.weight < self.eject_below

    def is_ejected(self, backend: str) -> bool:
        b = self._backends.get(backend)
        return b is not None and b.state is TrustState.EJECTED

    def probabilities(self, backend: str) -> dict[str, float]:
        b = self._backends.get(backend)
        return {} if b is None else dict(b.probabilities)

    @property
    def backends(self) -> list[str]:
        return list(self._backends)

    def ejection_limit(self) -> int:
        """How many backends may be ejected at once (the floor)."""
        return math.floor(self.max_ejected_fraction * len(self._backends) + 1e-9)

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {
                "url": url,
                "weight": round(b.weight, 6),
                "state": b.state.value,
                # below the ejection threshold but kept in rotation by the floor
                "held": self.is_held(url),
                "probabilities": {k: round(v, 6) for k, v in b.probabilities.items()},
                "features": dict(b.features),
                "ejections": b.ejections,
                "since": b.since,
            }
            for url, b in self._backends.items()
        ]

    def describe(self) -> dict[str, Any]:
        """The scorer in use (for /trust's `model`)."""
        describe = getattr(self.scorer, "describe", None)
        if callable(describe):
            return describe()
        return {"version": self.scorer.version, "classes": list(self.scorer.classes)}

    # -- events --------------------------------------------------------------------------

    def apply(self, backend: str, event: TrustEvent, now: float) -> TrustState:
        """Move `backend` through the transition table on `event`; returns the new state.

        `update` and `tick` classify weights and timers into events and call this; it is
        public so a caller (or a test) can inject an event directly.
        """
        b = self._backends[backend]
        self._move(b, event, now)
        self._refresh()
        return b.state

    def _move(self, b: BackendTrust, event: TrustEvent, now: float) -> None:
        new = TRANSITIONS[(b.state, event)]
        if new is b.state:
            return
        if new is TrustState.EJECTED:
            b.ejections += 1
            b.ejected_at = now
        elif new is TrustState.TRUSTED:
            b.ejections = 0
            b.ejected_at = None
        elif event is TrustEvent.RETRY_DUE:
            b.weight = self.probation_weight
            b.ejected_at = None
        b.state = new
        b.since = now

    def ejection_time(self, backend: str) -> float:
        """How long the current (or next) ejection of `backend` lasts, seconds."""
        n = max(1, self._backends[backend].ejections)
        return min(self.max_ejection_s, self.ejection_base_s * n)

    def _score(self, features: Mapping[str, Mapping[str, float]]) -> None:
        scored = [url for url in self._backends if url in features]
        if not scored:
            return
        names = self.scorer.feature_names
        try:
            X = np.array([[float(features[u][n]) for n in names] for u in scored])
        except KeyError as err:
            raise ValueError(
                f"features lack {err.args[0]!r}, which scorer {self.scorer.version} needs"
            ) from None
        P = np.asarray(self.scorer.predict_proba(X), dtype=np.float64)
        classes = self.scorer.classes
        alpha = self.smoothing
        for url, row in zip(scored, P, strict=True):
            b = self._backends[url]
            f = features[url]
            p_healthy = float(row[self._healthy_col])
            if has_samples(f, self.min_samples):
                target = p_healthy
            elif shows_failure(f):
                target = min(p_healthy, b.weight)  # failing health checks: may only fall
            else:
                target = b.weight  # no traffic and no failure is no evidence either way
            b.weight = (1.0 - alpha) * b.weight + alpha * target
            b.probabilities = {c: float(p) for c, p in zip(classes, row, strict=True)}
            b.features = {k: float(v) for k, v in f.items()}

    def tick(self, now: float) -> None:
        """Give ejected backends whose time is over another chance (PROBATION)."""
        for url, b in self._backends.items():
            if b.ejected_at is not None and now - b.ejected_at >= self.ejection_time(url):
                self._move(b, TrustEvent.RETRY_DUE, now)
        self._refresh()

    def update(self, features: Mapping[str, Mapping[str, float]], now: float) -> None:
        """Score every backend in `features` at once, then apply hysteresis and the floor."""
        self._score(features)
        self.tick(now)
        low: list[tuple[float, str]] = []
        for url, b in self._backends.items():
            if b.weight >= self.readmit_above:
                self._move(b, TrustEvent.HIGH, now)
            elif b.weight >= self.eject_below:
                self._move(b, TrustEvent.MID, now)
            elif b.state is TrustState.EJECTED:
                self._move(b, TrustEvent.LOW, now)
            else:
                low.append((b.weight, url))
        room = self.ejection_limit() - sum(
            b.state is TrustState.EJECTED for b in self._backends.values()
        )
        for i, (_, url) in enumerate(sorted(low)):
            event = TrustEvent.LOW if i < room else TrustEvent.LOW_HELD
            self._move(self._backends[url], event, now)
        self._refresh()
