"""The shipped ONNX trust model: what it carries, parity with scikit-learn, refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from twlb.balancer.features import FEATURE_NAMES
from twlb.balancer.onnx_scorer import (
    META_CLASSES,
    META_FEATURES,
    META_VERSION,
    ModelRefused,
    OnnxScorer,
)
from twlb.balancer.scoring import Scorer
from twlb.ml.dataset import SHIPPED_DATA, read_datasets
from twlb.ml.train import (
    PARITY_TOLERANCE,
    REPRODUCTION_TOLERANCE,
    evidence_windows,
    export_onnx,
    parity,
    split_by_seed,
    svm_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "ml" / "models" / "trust-svm.onnx"
REPORT = ROOT / "ml" / "models" / "training_report.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(REPORT.read_text())


def _with_metadata(**changes: str) -> bytes:
    model = onnx.load_model(MODEL)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    del model.metadata_props[:]
    for k, v in props.items():
        if v is not None:
            p = model.metadata_props.add()
            p.key, p.value = k, v
    return model.SerializeToString()


def test_shipped_model_carries_features_classes_version_and_its_data_digest(
    report: dict,
) -> None:
    scorer = OnnxScorer.load(MODEL)
    assert isinstance(scorer, Scorer)
    assert scorer.feature_names == FEATURE_NAMES
    assert "healthy" in scorer.classes and "byzantine" in scorer.classes
    assert scorer.version == report["model"]["version"]
    shipped = read_datasets(SHIPPED_DATA, FEATURE_NAMES)
    assert scorer.info.training_data_digest == shipped.digest == report["data"]["digest"]
    described = scorer.describe()
    assert {"name", "version", "digest"} <= described.keys()
    assert described["scores"]["macro_f1"] == pytest.approx(report["summary"]["macro_f1"])


def test_onnxruntime_and_scikit_learn_agree_on_the_held_out_runs(report: dict) -> None:
    ds, _ = evidence_windows(read_datasets(SHIPPED_DATA, FEATURE_NAMES))
    split = split_by_seed(ds.seed, report["split"]["holdout_fraction"], report["seed"], ds.y)
    assert list(split.holdout_seeds) == report["split"]["holdout_seeds"]
    assert not set(split.holdout_seeds) & set(report["split"]["train_seeds"])
    pipeline = svm_pipeline(report["seed"]).set_params(**report["search"]["best_params"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipeline.fit(ds.X[split.train].astype(np.float32), ds.y[split.train].astype(str))
    held_out = ds.X[split.holdout]
    fresh = OnnxScorer.from_bytes(
        export_onnx(pipeline, FEATURE_NAMES, "test", ds.digest, {}), "fresh export"
    )
    check = parity(fresh, pipeline, held_out)
    assert check["rows"] == len(split.holdout) > 0
    assert check["labels_equal"]
    assert check["max_probability_difference"] <= PARITY_TOLERANCE
    # The shipped file is this very model: refitting from its data reproduces it.
    shipped = parity(OnnxScorer.load(MODEL), pipeline, held_out)
    assert shipped["labels_equal"]
    assert shipped["max_probability_difference"] <= REPRODUCTION_TOLERANCE


def test_one_batched_call_scores_a_hundred_backends() -> None:
    scorer = OnnxScorer.load(MODEL)
    X = read_datasets(SHIPPED_DATA, FEATURE_NAMES).X[:100]
    P = scorer.predict_proba(X)
    assert P.shape == (len(X), len(scorer.classes))
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-5)
    assert scorer.predict_proba(np.zeros((0, len(FEATURE_NAMES)))).shape == (0, 5)
    with pytest.raises(ValueError, match="expected shape"):
        scorer.predict_proba(np.zeros((3, len(FEATURE_NAMES) - 1)))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {META_FEATURES: json.dumps([*FEATURE_NAMES[1:], FEATURE_NAMES[0]])},
            "order differs at position 0",
        ),
        ({META_FEATURES: json.dumps(list(FEATURE_NAMES[:-1]))}, "missing \\['inflight_mean'\\]"),
        (
            {META_FEATURES: json.dumps([*FEATURE_NAMES[:-1], "cpu_load"])},
            "unexpected \\['cpu_load'\\]",
        ),
        ({META_FEATURES: "not json"}, "is not JSON"),
        ({META_CLASSES: json.dumps(["healthy", "sleepy"])}, "unknown classes \\['sleepy'\\]"),
        ({META_VERSION: None}, "not a TW-LB trust model"),
    ],
)
def test_a_model_that_does_not_fit_the_balancer_is_refused_with_the_reason(
    tmp_path: Path, changes: dict, reason: str
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(_with_metadata(**changes))
    with pytest.raises(ModelRefused, match=reason) as err:
        OnnxScorer.load(path)
    assert str(path) in str(err.value)


def test_a_corrupt_or_missing_file_is_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    with pytest.raises(ModelRefused, match="not a valid ONNX model"):
        OnnxScorer.load(corrupt)
    with pytest.raises(ModelRefused, match="cannot read"):
        OnnxScorer.load(tmp_path / "absent.onnx")
