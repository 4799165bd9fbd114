"""Trust engine and heuristic scorer: states, hysteresis, the ejection floor, hot swap."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from twlb.balancer.features import FEATURE_NAMES, WindowStats, compute_features, feature_vector
from twlb.balancer.scoring import HeuristicScorer, Scorer
from twlb.balancer.trust import TRANSITIONS, TrustEngine, TrustEvent, TrustState

FLEET = [f"b{i}" for i in range(6)]
HEALTHY = WindowStats(
    requests=100,
    successes=100,
    latency_p50_s=0.01,
    latency_p95_s=0.02,
    latency_p99_s=0.03,
    audits=10,
)
ERRORING = replace(HEALTHY, successes=10, errors_5xx=90)
BYZANTINE = replace(HEALTHY, audit_mismatches=10)
CRASHED = WindowStats(requests=20, connect_errors=20, health_checks=5, health_failures=5)
SLOW = WindowStats(
    requests=100, successes=40, timeouts=60, latency_p50_s=2.0, latency_p95_s=2.0, latency_p99_s=2.0
)
SILENT = WindowStats()


def _features(**by_backend: WindowStats) -> dict[str, dict[str, float]]:
    stats = {b: HEALTHY for b in FLEET} | by_backend
    return compute_features(stats)


def _engine(**kwargs) -> TrustEngine:
    engine = TrustEngine(HeuristicScorer(), **kwargs)
    engine.set_backends(FLEET, 0.0)
    return engine


# -- heuristic scorer ----------------------------------------------------------------------


def test_heuristic_scorer_names_the_likely_class() -> None:
    scorer = HeuristicScorer()
    assert isinstance(scorer, Scorer)
    assert scorer.feature_names == FEATURE_NAMES
    assert scorer.classes == ("healthy", "delay", "crash", "error", "byzantine")
    f = _features(b1=ERRORING, b2=BYZANTINE, b3=CRASHED, b4=SLOW)
    X = np.array([feature_vector(f[b]) for b in FLEET[:5]])
    P = scorer.predict_proba(X)
    assert P.shape == (5, 5)
    assert np.allclose(P.sum(axis=1), 1.0)
    assert [scorer.classes[i] for i in P.argmax(axis=1)] == [
        "healthy",
        "error",
        "byzantine",
        "crash",
        "delay",
    ]
    assert P[0, 0] > 0.99 and P[1, 0] < 0.1


def test_heuristic_scorer_is_soft_on_thin_evidence() -> None:
    scorer = HeuristicScorer()
    few = compute_features({"a": WindowStats(requests=2, successes=1, errors_5xx=1)})["a"]
    many = compute_features({"a": WindowStats(requests=200, successes=100, errors_5xx=100)})["a"]
    p_few, p_many = scorer.predict_proba(np.array([feature_vector(few), feature_vector(many)]))
    assert 0.3 < p_few[0] < 0.8 and p_many[0] < 0.05


def test_heuristic_scorer_refuses_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"expected shape \(n, 12\)"):
        HeuristicScorer().predict_proba(np.zeros((2, 3)))
    assert HeuristicScorer().predict_proba(np.zeros((0, 12))).shape == (0, 5)


# -- state machine -------------------------------------------------------------------------


def test_transition_table_is_total() -> None:
    assert set(TRANSITIONS) == {(s, e) for s in TrustState for e in TrustEvent}


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS))
def test_every_transition_lands_where_the_table_says(state, event) -> None:
    engine = _engine()
    route = {
        TrustState.PROBATION: [],
        TrustState.TRUSTED: [TrustEvent.HIGH],
        TrustState.EJECTED: [TrustEvent.LOW],
    }[state]
    for step in route:
        engine.apply("b0", step, 1.0)
    assert engine.state("b0") is state
    assert engine.apply("b0", event, 2.0) is TRANSITIONS[(state, event)]


def test_new_backends_start_in_probation_with_a_moderate_weight() -> None:
    engine = _engine(probation_weight=0.5)
    assert {engine.state(b) for b in FLEET} == {TrustState.PROBATION}
    assert engine.weight("b0") == 0.5
    assert engine.probabilities("b0") == {}


def test_healthy_backends_are_trusted_and_bad_ones_ejected_by_class() -> None:
    engine = _engine()
    features = _features(b1=ERRORING, b2=BYZANTINE, b3=SLOW)
    engine.update(features, 1.0)
    assert [engine.state(b) for b in FLEET] == [
        TrustState.TRUSTED,
        TrustState.EJECTED,
        TrustState.EJECTED,
        TrustState.EJECTED,
        TrustState.TRUSTED,
        TrustState.TRUSTED,
    ]
    assert engine.weight("b0") == pytest.approx(0.75)  # EWMA from 0.5 with alpha 0.5
    assert max(engine.probabilities("b2"), key=engine.probabilities("b2").get) == "byzantine"
    row = engine.row("b2")
    assert row["state"] == "ejected" and row["held"] is False and row["ejections"] == 1
    assert row["probabilities"] == pytest.approx(engine.probabilities("b2"), abs=1e-6)
    assert engine.row("never-scored") == {
        "weight": engine.probation_weight,
        "state": "probation",
        "held": False,
        "probabilities": {},
        "ejections": 0,
        "proven": False,
        "evidence": engine.evidence.describe("never-scored"),
    }
    assert engine.row("never-scored")["evidence"]["audits"] == 0


def test_hysteresis_keeps_state_between_the_thresholds() -> None:
    engine = _engine(smoothing=0.5, eject_below=0.3, readmit_above=0.7)
    engine.update(_features(), 1.0)
    assert engine.state("b0") is TrustState.TRUSTED
    engine.update(_features(b0=ERRORING), 2.0)  # 0.75 -> ~0.38: mid, still trusted
    assert 0.3 < engine.weight("b0") < 0.7 and engine.state("b0") is TrustState.TRUSTED
    engine.update(_features(b0=ERRORING), 3.0)
    assert engine.state("b0") is TrustState.EJECTED
    engine.update(_features(), 4.0)  # back to mid: still ejected
    assert 0.3 < engine.weight("b0") < 0.7 and engine.state("b0") is TrustState.EJECTED
    engine.update(_features(), 5.0)
    engine.update(_features(), 6.0)
    assert engine.state("b0") is TrustState.TRUSTED


def test_floor_never_ejects_more_than_the_fraction_and_worst_go_first() -> None:
    engine = _engine(max_ejected_fraction=0.5)
    bad = {b: ERRORING for b in FLEET}
    bad["b5"] = WindowStats(requests=100, successes=70, errors_5xx=30)  # the least bad
    engine.update(compute_features(bad), 1.0)
    engine.update(compute_features(bad), 2.0)
    states = [engine.state(b) for b in FLEET]
    assert states.count(TrustState.EJECTED) == 3 == engine.ejection_limit()
    assert engine.state("b5") is not TrustState.EJECTED
    rows = {b: engine.row(b) for b in FLEET}
    held = [b for b in FLEET if rows[b]["held"]]  # low, in rotation only by the floor
    assert held and all(rows[b]["state"] != "ejected" for b in held)
    assert not any(rows[b]["held"] for b in FLEET if rows[b]["state"] == "ejected")


def test_absence_of_traffic_does_not_readmit_an_ejected_backend() -> None:
    engine = _engine(min_samples=5)
    engine.update(_features(b0=BYZANTINE), 1.0)
    weight = engine.weight("b0")
    for t in range(2, 20):
        engine.update(_features(b0=SILENT), float(t))
        assert engine.weight("b0") <= weight
    assert engine.state("b0") is TrustState.EJECTED
    engine.update(_features(b0=CRASHED), 20.0)  # failing checks still count without traffic
    assert engine.weight("b0") < weight


def test_a_fleet_that_has_seen_no_traffic_yet_is_not_ejected_at_start_up() -> None:
    engine = _engine(min_samples=5)
    quiet = compute_features({b: SILENT for b in FLEET})
    for t in range(1, 30):
        engine.update(quiet, float(t))
    assert all(engine.state(b) is TrustState.PROBATION for b in FLEET)
    assert all(engine.weight(b) == 0.5 for b in FLEET)
    # A quiet backend whose health checks fail is still taken out.
    down = compute_features({b: SILENT for b in FLEET} | {"b0": CRASHED})
    for t in range(30, 40):
        engine.update(down, float(t))
    assert engine.state("b0") is TrustState.EJECTED


def test_ejected_backend_gets_another_chance_with_growing_back_off() -> None:
    engine = _engine(ejection_base_s=30.0)
    engine.update(_features(b0=ERRORING), 1.0)
    assert engine.state("b0") is TrustState.EJECTED
    engine.update(_features(b0=SILENT), 30.9)
    assert engine.state("b0") is TrustState.EJECTED
    engine.update(_features(b0=SILENT), 31.0)
    assert engine.state("b0") is TrustState.PROBATION and engine.weight("b0") == 0.5
    engine.update(_features(b0=ERRORING), 32.0)  # still bad: out again, for twice as long
    assert engine.state("b0") is TrustState.EJECTED and engine.ejection_time("b0") == 60.0
    engine.tick(91.9)
    assert engine.state("b0") is TrustState.EJECTED
    engine.tick(92.0)
    assert engine.state("b0") is TrustState.PROBATION
    engine.update(_features(), 93.0)
    assert engine.state("b0") is TrustState.TRUSTED and engine.ejection_time("b0") == 30.0


class _CountingScorer(HeuristicScorer):
    """The heuristic, counting its batched calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.version = "counting-1"

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self.calls.append(len(X))
        return super().predict_proba(X)


class _AlwaysSick:
    classes = ("byzantine", "healthy")
    feature_names = ("audit_mismatch_ratio",)
    version = "sick-1"

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.tile([0.9, 0.1], (len(X), 1))


def test_one_batched_call_per_update_and_hot_swap() -> None:
    scorer = _CountingScorer()
    engine = TrustEngine(scorer)
    engine.set_backends(FLEET, 0.0)
    engine.update(_features(), 1.0)
    assert scorer.calls == [6]
    engine.set_scorer(_AlwaysSick())
    engine.update(_features(), 2.0)
    assert scorer.calls == [6]
    assert engine.probabilities("b0") == {"byzantine": 0.9, "healthy": 0.1}
    assert engine.describe() == {"version": "sick-1", "classes": ["byzantine", "healthy"]}


def test_bad_scorers_features_and_settings_are_refused() -> None:
    class NoHealthy(_AlwaysSick):
        classes = ("byzantine", "error")

    with pytest.raises(ValueError, match="lack 'healthy'"):
        TrustEngine(NoHealthy())

    class Foreign(_AlwaysSick):
        feature_names = ("audit_mismatch_ratio", "cpu_temperature")

    with pytest.raises(ValueError, match=r"does not compute: \['cpu_temperature'\]"):
        TrustEngine(Foreign())
    engine = _engine()
    features = _features()
    del features["b0"]["audit_mismatch_ratio"]
    with pytest.raises(ValueError, match="features lack 'audit_mismatch_ratio'"):
        engine.update(features, 1.0)
    with pytest.raises(ValueError, match="eject_below < readmit_above"):
        TrustEngine(HeuristicScorer(), eject_below=0.8, readmit_above=0.7)
    with pytest.raises(ValueError, match="smoothing"):
        TrustEngine(HeuristicScorer(), smoothing=0.0)
