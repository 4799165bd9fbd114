"""The trained trust model served from ONNX: a Scorer backed by one onnxruntime session.

A model file carries in its metadata_props everything needed to use it safely: the
feature names in input order, the classes in output order, a name, a version, the
digest of the data it was trained on and its held-out scores. A model whose features
do not match the balancer's FEATURE_NAMES is refused with a `ModelRefused` naming the
difference, so a stale or foreign model can never score backends with shifted columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from twlb.spec import NodeClass

#: metadata_props keys a TW-LB model file carries (written by twlb.ml.train).
META_FEATURES = "twlb.feature_names"
META_CLASSES = "twlb.classes"
META_NAME = "twlb.model_name"
META_VERSION = "twlb.version"
META_DATA_DIGEST = "twlb.training_data_digest"
META_SCORES = "twlb.scores"
REQUIRED_METADATA = (META_FEATURES, META_CLASSES, META_NAME, META_VERSION, META_DATA_DIGEST)

#: ONNX graph names: the input tensor and the probability output (zipmap off).
INPUT_NAME = "features"
PROBABILITIES_OUTPUT = "probabilities"


class ModelRefused(ValueError):
    """A model file that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model says about itself (shown in the balancer's /trust)."""

    path: str
    name: str
    version: str
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    training_data_digest: str
    file_sha256: str
    scores: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.training_data_digest,
            "file_sha256": self.file_sha256,
            "path": self.path,
            "classes": list(self.classes),
            "scores": dict(self.scores),
        }


def _feature_mismatch(found: Sequence[str], expected: Sequence[str]) -> str | None:
    """Why `found` is not `expected` (missing, unexpected, or reordered), or None."""
    if list(found) == list(expected):
        return None
    missing = [f for f in expected if f not in found]
    extra = [f for f in found if f not in expected]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if not parts:
        first = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
        parts.append(f"order differs at position {first}: {found[first]!r} != {expected[first]!r}")
    return "feature names do not match the balancer's: " + "; ".join(parts)


def _json_list(meta: Mapping[str, str], key: str, where: str) -> tuple[str, ...]:
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise ModelRefused(f"{where}: metadata {key} is not JSON: {err}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ModelRefused(f"{where}: metadata {key} must be a non-empty list of strings")
    return tuple(value)


def _session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # One small batch per tick inside an event loop on a 2-core box: a thread pool
    # would only add wake-up latency and steal the core serving requests.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class OnnxScorer:
    """Scorer protocol over an ONNX classifier: one batched onnxruntime run per call."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo) -> None:
        self._session = session
        self.info = info
        self.classes: tuple[str, ...] = info.classes
        self.feature_names: tuple[str, ...] = info.feature_names
        self.version: str = info.version
        self._outputs = [PROBABILITIES_OUTPUT]

    @classmethod
    def load(cls, path: str | Path, expected_features: Sequence[str] | None = None) -> OnnxScorer:
        """Load and check a model file; raise ModelRefused naming the file and the reason."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as err:
            raise ModelRefused(f"{p}: cannot read model: {err.strerror}") from None
        return cls.from_bytes(data, str(p), expected_features)

    @classmethod
    def from_bytes(
        cls, data: bytes, source: str, expected_features: Sequence[str] | None = None
    ) -> OnnxScorer:
        if expected_features is None:
            from twlb.balancer.features import FEATURE_NAMES

            expected_features = FEATURE_NAMES
        try:
            model = onnx.load_model_from_string(data)
            onnx.checker.check_model(model)
        except Exception as err:  # onnx raises DecodeError, ValidationError and others
            raise ModelRefused(f"{source}: not a valid ONNX model: {err}") from None
        meta = {p.key: p.value for p in model.metadata_props}
        absent = [k for k in REQUIRED_METADATA if k not in meta]
        if absent:
            raise ModelRefused(f"{source}: not a TW-LB trust model: metadata lacks {absent}")
        features = _json_list(meta, META_FEATURES, source)
        problem = _feature_mismatch(features, expected_features)
        if problem:
            raise ModelRefused(f"{source}: {problem}")
        classes = _json_list(meta, META_CLASSES, source)
        known = {c.value for c in NodeClass}
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise ModelRefused(f"{source}: unknown classes {unknown} (known: {sorted(known)})")
        if NodeClass.HEALTHY.value not in classes:
            raise ModelRefused(f"{source}: classes {list(classes)} lack 'healthy'")
        try:
            scores = json.loads(meta.get(META_SCORES, "{}"))
        except json.JSONDecodeError:
            scores = {}
        try:
            session = ort.InferenceSession(
                data, sess_options=_session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelRefused(f"{source}: onnxruntime cannot load it: {err}") from None
        info = ModelInfo(
            path=source,
            name=meta[META_NAME],
            version=meta[META_VERSION],
            classes=classes,
            feature_names=features,
            training_data_digest=meta[META_DATA_DIGEST],
            file_sha256=hashlib.sha256(data).hexdigest(),
            scores=scores if isinstance(scores, dict) else {},
        )
        scorer = cls(session, info)
        scorer._check_graph(source)
        return scorer

    def _check_graph(self, source: str) -> None:
        inputs = self._session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise ModelRefused(f"{source}: expected one input {INPUT_NAME!r}, got {inputs}")
        width = inputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.feature_names):
            raise ModelRefused(
                f"{source}: input takes {width} features, metadata names {len(self.feature_names)}"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if PROBABILITIES_OUTPUT not in outputs:
            raise ModelRefused(f"{source}: no {PROBABILITIES_OUTPUT!r} output (got {outputs})")
        try:
            probe = self.predict_proba(np.zeros((1, len(self.feature_names))))
        except Exception as err:  # a graph that loads but cannot run is just as unusable
            raise ModelRefused(f"{source}: scoring a probe row failed: {err}") from None
        if probe.shape != (1, len(self.classes)) or not np.all(np.isfinite(probe)):
            raise ModelRefused(
                f"{source}: probabilities have shape {probe.shape}, "
                f"expected (1, {len(self.classes)}) finite values"
            )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, len(classes)), in `classes` order."""
        rows = np.asarray(X, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self.feature_names):
            raise ValueError(f"expected shape (n, {len(self.feature_names)}), got {rows.shape}")
        if rows.shape[0] == 0:
            return np.zeros((0, len(self.classes)))
        (probabilities,) = self._session.run(self._outputs, {INPUT_NAME: rows})
        return np.asarray(probabilities, dtype=np.float64)

    def predict(self, X: np.ndarray) -> list[str]:
        """The most probable class of each row."""
        return [self.classes[i] for i in np.argmax(self.predict_proba(X), axis=1)]

    def labels(self, X: np.ndarray) -> np.ndarray:
        """The graph's own label output (the SVM's vote), for parity with scikit-learn."""
        (labels,) = self._session.run(["label"], {INPUT_NAME: np.asarray(X, dtype=np.float32)})
        return np.asarray(labels)

    def describe(self) -> dict[str, Any]:
        return self.info.describe()
