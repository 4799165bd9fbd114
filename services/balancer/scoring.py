"""Scorers: map feature rows to probabilities over node classes (the trust model's interface).

`Scorer` is the protocol the trust engine calls once per tick with every backend's row;
the ONNX model (onnx_scorer.py) and the documented `HeuristicScorer` below both meet it.

The heuristic's rules. Each fault class gets an evidence score in [0, 1], a linear ramp
from a threshold where the symptom starts to count to one where it is conclusive,
damped by how much traffic backs it (`1 - exp(-n / CONFIDENCE_SCALE)` for n observations):
- byzantine: audit_mismatch_ratio, ramp 0.05 -> 0.5, weighted by the audits seen;
- error:     error_5xx_ratio, ramp 0.05 -> 0.5, weighted by the requests seen;
- crash:     the larger of connect_error_ratio (ramp 0.05 -> 0.5, by requests) and
             health_fail_ratio (ramp 0.2 -> 0.8; checks run without traffic);
- delay:     the larger of timeout_ratio (ramp 0.05 -> 0.5, by requests) and
             latency_p95_rel (ramp 3 -> 10 times the fleet median p50).
Then P(healthy) = prod(1 - e_k) and the rest, 1 - P(healthy), is shared among the fault
classes in proportion to their evidence. The output is soft, sums to one per row, and is
computed for all rows at once with numpy.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from twlb.balancer.features import FEATURE_NAMES

from twlb.spec import NodeClass


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns feature rows into class probabilities."""

    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    version: str

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Shape (n, len(feature_names)) in, (n, len(classes)) out, rows summing to 1."""
        ...


#: Observations for which evidence counts 63 % (damps verdicts drawn from a handful of tries;
#: ten observations count 96 %).
CONFIDENCE_SCALE = 3.0


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


class HeuristicScorer:
    """Documented rules from features to class probabilities (see the module docstring)."""

    classes: tuple[str, ...] = tuple(c.value for c in NodeClass)
    feature_names: tuple[str, ...] = FEATURE_NAMES
    version: str = "heuristic-1"

    def __init__(self) -> None:
        col = {name: i for i, name in enumerate(self.feature_names)}
        self._col = col
        self._out = {c: i for i, c in enumerate(self.classes)}

    def evidence(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Evidence in [0, 1] for each fault class, per row."""
        c = self._col
        requests = np.expm1(X[:, c["request_count_log1p"]])
        audits = np.expm1(X[:, c["audit_count_log1p"]])
        by_requests = -np.expm1(-requests / CONFIDENCE_SCALE)
        by_audits = -np.expm1(-audits / CONFIDENCE_SCALE)
        return {
            NodeClass.BYZANTINE: _ramp(X[:, c["audit_mismatch_ratio"]], 0.05, 0.5) * by_audits,
            NodeClass.ERROR: _ramp(X[:, c["error_5xx_ratio"]], 0.05, 0.5) * by_requests,
            NodeClass.CRASH: np.maximum(
                _ramp(X[:, c["connect_error_ratio"]], 0.05, 0.5) * by_requests,
                _ramp(X[:, c["health_fail_ratio"]], 0.2, 0.8),
            ),
            NodeClass.DELAY: np.maximum(
                _ramp(X[:, c["timeout_ratio"]], 0.05, 0.5) * by_requests,
                _ramp(X[:, c["latency_p95_rel"]], 3.0, 10.0),
            ),
        }

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        rows = np.asarray(X, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != len(self.feature_names):
            raise ValueError(f"expected shape (n, {len(self.feature_names)}), got {rows.shape}")
        out = np.zeros((rows.shape[0], len(self.classes)))
        if rows.shape[0] == 0:
            return out
        evidence = self.evidence(rows)
        healthy = np.ones(rows.shape[0])
        total = np.zeros(rows.shape[0])
        for e in evidence.values():
            healthy *= 1.0 - e
            total += e
        faulty = 1.0 - healthy
        share = np.divide(faulty, total, out=np.zeros_like(total), where=total > 0)
        for cls, e in evidence.items():
            out[:, self._out[cls]] = e * share
        out[:, self._out[NodeClass.HEALTHY]] = healthy
        return out

    def describe(self) -> dict[str, object]:
        return {"name": "heuristic", "version": self.version, "classes": list(self.classes)}
