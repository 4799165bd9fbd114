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
  the count;
- proof overrides the model: audit verdicts go to the evidence book (evidence.py), and a
  backend it proves a liar is ejected at once, whatever its weight, stays out until the
  book's back-off ends (not the model's timer, not a HIGH score), and comes back in
  PROBATION. Proven liars are exempt from the floor and count against it first: the
  model may eject only the room they leave, so the floor never keeps a liar in rotation
  while it ejects a node whose failures a client can see and retry. Evidence gathered
  elsewhere (`import_evidence`: a restart, a replica) is acted on as proof here would be;
- a backend held by the floor is routed at weight 0, the least its state allows (the
  policy's minimum trickle, which keeps fresh evidence coming);
- every ejection (with its reason), readmission and hold is queued as a `TrustChange`
  for the server to log and count (`drain_changes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from twlb.balancer.evidence import EvidenceBook, EvidenceRule, Standing, Verdict
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


class EjectionReason(StrEnum):
    """Why a backend left rotation (the `reason` label of twlb_balancer_ejections_total)."""

    MODEL = "model"  # its trust weight fell below eject_below
    PROVEN_LIAR = "proven_liar"  # audits proved it a liar
    HEALTH = "health"  # failed health checks or passive failures
    GOSSIP = "gossip"  # a peer balancer's view


class ChangeKind(StrEnum):
    EJECTION = "ejection"
    READMISSION = "readmission"
    HOLD = "hold"  # below the ejection threshold, kept in rotation by the floor


@dataclass(frozen=True)
class TrustChange:
    """One event of a backend's rotation, as data (logged and counted by the server)."""

    kind: ChangeKind
    backend: str
    at: float
    reason: EjectionReason | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """The change as one structured log record."""
        record: dict[str, Any] = {"event": self.kind.value, "backend": self.backend}
        if self.reason is not None:
            record["reason"] = self.reason.value
        return record | {"at": round(self.at, 3)} | self.detail


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
    proven: bool = False  # ejected on proof of lies: out until the evidence back-off ends


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
        evidence_rule: EvidenceRule | None = None,
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
        #: weight of every backend that is not ejected (what routing reads on each pick);
        #: a new mapping after every change of weight or state, never one changed in place
        self.admitted: dict[str, float] = {}
        #: when each backend in PROBATION entered it (rebuilt with `admitted`)
        self.probation: dict[str, float] = {}
        self.evidence = EvidenceBook(evidence_rule or EvidenceRule())
        self._held: set[str] = set()
        self._changes: list[TrustChange] = []
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
        self.evidence.set_backends(self._backends)
        self._refresh(now)

    def _refresh(self, now: float) -> None:
        held = {url for url in self._backends if self.is_held(url)}
        for url in held - self._held:
            self._changes.append(TrustChange(ChangeKind.HOLD, url, now))
        self._held = held
        # A held backend gets the least its state allows: the policy's minimum trickle.
        self.admitted = {
            url: 0.0 if url in held else b.weight
            for url, b in self._backends.items()
            if b.state is not TrustState.EJECTED
        }
        self.probation = {
            url: b.since for url, b in self._backends.items() if b.state is TrustState.PROBATION
        }

    def drain_changes(self) -> list[TrustChange]:
        """The rotation events since the last call, oldest first."""
        changes, self._changes = self._changes, []
        return changes

    # -- reading -------------------------------------------------------------------------

    def weight(self, backend: str) -> float:
        b = self._backends.get(backend)
        return self.probation_weight if b is None else b.weight

    def state(self, backend: str) -> TrustState:
        b = self._backends.get(backend)
        return TrustState.PROBATION if b is None else b.state

    def is_held(self, backend: str) -> bool:
        """Below the ejection threshold, but kept in rotation by the floor."""
        b = self._backends.get(backend)
        return b is not None and b.state is not TrustState.EJECTED and b.weight < self.eject_below

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def is_proven(self, backend: str) -> bool:
        """Ejected on proof of lies (out of rotation until its back-off ends)."""
        b = self._backends.get(backend)
        return b is not None and b.proven

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

    def row(self, backend: str) -> dict[str, Any]:
        """The engine's part of `backend`'s row in the balancer's /trust (JSON-ready); a
        backend not scored yet is in probation at the probation weight."""
        b = self._backends.get(backend)
        return {
            "weight": round(self.weight(backend), 6),
            "state": self.state(backend).value,
            # below the ejection threshold but kept in rotation by the floor
            "held": self.is_held(backend),
            "probabilities": {}
            if b is None
            else {k: round(v, 6) for k, v in b.probabilities.items()},
            "ejections": 0 if b is None else b.ejections,
            "proven": self.evidence.is_proven(backend),
            "evidence": self.evidence.describe(backend),
        }

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
        self._move(backend, b, event, now)
        self._refresh(now)
        return b.state

    def _move(
        self,
        url: str,
        b: BackendTrust,
        event: TrustEvent,
        now: float,
        reason: EjectionReason = EjectionReason.MODEL,
    ) -> None:
        if b.proven and event is not TrustEvent.RETRY_DUE:
            return  # proof, not the model, decides when a proven liar comes back
        new = TRANSITIONS[(b.state, event)]
        if new is b.state:
            return
        if new is TrustState.EJECTED:
            b.ejections += 1
            b.ejected_at = now
            b.proven = reason is EjectionReason.PROVEN_LIAR
            detail = {"weight": round(b.weight, 6)}
            if b.proven:
                detail |= self.evidence.describe(url)
            self._changes.append(TrustChange(ChangeKind.EJECTION, url, now, reason, detail))
        else:
            if b.state is TrustState.EJECTED:
                self._changes.append(TrustChange(ChangeKind.READMISSION, url, now))
            if new is TrustState.TRUSTED:
                b.ejections = 0
                b.ejected_at = None
            elif event is TrustEvent.RETRY_DUE:
                b.weight = self.probation_weight
                b.ejected_at = None
                b.proven = False
        b.state = new
        b.since = now

    def record_audit(self, backend: str, mismatch: bool, now: float) -> Verdict:
        """One audit verdict on `backend`; a backend it proves a liar is ejected now,
        whatever its weight and whatever the floor."""
        b = self._backends.get(backend)
        if b is None:
            return Verdict.NONE
        verdict = self.evidence.record(backend, mismatch, now)
        if verdict is Verdict.PROVEN:
            if b.state is TrustState.EJECTED:
                b.proven = True  # ejected by the model already: now held out by proof
            else:
                self._move(backend, b, TrustEvent.LOW, now, EjectionReason.PROVEN_LIAR)
            self._refresh(now)
        return verdict

    def import_evidence(self, doc: Any, now: float) -> list[str]:
        """Put an evidence document (`EvidenceBook.export`) in force for the backends of
        this fleet it names; returns those. A backend it shows proven is ejected now (as
        a proof here would eject it, until the back-off it carries ends); one proven here
        that it shows not proven comes back in PROBATION. ValueError (naming what is
        wrong) before anything changes when the document is not valid evidence."""
        parsed = self.evidence.parse(doc, now)
        taken = [url for url in parsed if url in self._backends]
        for url in taken:
            evidence = parsed[url]
            self.evidence.restore(url, evidence)
            b = self._backends[url]
            if evidence.standing is Standing.PROVEN and not b.proven:
                if b.state is TrustState.EJECTED:
                    b.proven = True
                else:
                    self._move(url, b, TrustEvent.LOW, now, EjectionReason.PROVEN_LIAR)
            elif evidence.standing is not Standing.PROVEN and b.proven:
                self._move(url, b, TrustEvent.RETRY_DUE, now)
        self._refresh(now)
        return taken

    def ejection_time(self, backend: str) -> float:
        """How long the current (or next) model ejection of `backend` lasts, seconds."""
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
        """Give ejected backends whose time is over another chance (PROBATION): a model
        ejection after its timer, a proven liar only when its evidence back-off ends."""
        released = set(self.evidence.tick(now))
        for url, b in self._backends.items():
            if b.proven:
                due = url in released
            else:
                due = b.ejected_at is not None and now - b.ejected_at >= self.ejection_time(url)
            if due:
                self._move(url, b, TrustEvent.RETRY_DUE, now)
        self._refresh(now)

    def update(self, features: Mapping[str, Mapping[str, float]], now: float) -> None:
        """Score every backend in `features` at once, then apply hysteresis and the floor."""
        self._score(features)
        self.tick(now)
        low: list[tuple[float, str]] = []
        for url, b in self._backends.items():
            if b.proven:
                continue  # out on proof; the model has no say until its back-off ends
            if b.weight >= self.readmit_above:
                self._move(url, b, TrustEvent.HIGH, now)
            elif b.weight >= self.eject_below:
                self._move(url, b, TrustEvent.MID, now)
            elif b.state is TrustState.EJECTED:
                self._move(url, b, TrustEvent.LOW, now)
            else:
                low.append((b.weight, url))
        # Proven liars count against the floor first; the model ejects only what is left.
        room = self.ejection_limit() - sum(
            b.state is TrustState.EJECTED for b in self._backends.values()
        )
        for i, (_, url) in enumerate(sorted(low)):
            event = TrustEvent.LOW if i < room else TrustEvent.LOW_HELD
            self._move(url, self._backends[url], event, now)
        self._refresh(now)
