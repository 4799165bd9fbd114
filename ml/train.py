"""Train the trust SVM on labelled windows, compare it, export it to ONNX with its card.

Held-out runs are chosen by seed (a seeded share of the dataset's distinct run seeds)
and never seen by the search; hyperparameters are searched with GridSearchCV over
GroupKFold folds grouped by run id, so windows of one run never sit on both sides.
The SVM is compared on the same held-out split with the balancer's heuristic scorer
and two other models; the exported ONNX file is checked against scikit-learn on the
held-out set before it is written.
"""

from __future__ import annotations

import json
import random
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import classification_report, confusion_matrix, f1_score
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PowerTransformer, StandardScaler
from sklearn.svm import SVC
from twlb.balancer.onnx_scorer import (
    INPUT_NAME,
    META_CLASSES,
    META_DATA_DIGEST,
    META_FEATURES,
    META_NAME,
    META_SCORES,
    META_VERSION,
    OnnxScorer,
)
from twlb.balancer.settings import TRAINED_MODEL_FILE
from twlb.balancer.trust import is_evidence
from twlb.ml.dataset import Dataset, read_datasets

MODEL_NAME = "trust-svm"
REPORT_FILE = "training_report.json"
CONFUSION_PNG = "confusion_matrix.png"
CARD_FILE = "MODEL_CARD.md"
PARITY_TOLERANCE = 1e-4
# A refit from the same data and seed on another CPU is the same model up to the floating
# point of libsvm's solver and Platt scaling, which differ with the machine's SIMD paths:
# the labels are equal and the probabilities agree to within 5.1e-4 (measured between
# the machine that trained the shipped model and a CI machine). Reproduction is checked
# at ten times that; ONNX-against-scikit-learn parity on one machine stays at 1e-4.
REPRODUCTION_TOLERANCE = 5e-3
SVM_GRID: dict[str, list[Any]] = {
    "svm__C": [1.0, 10.0, 100.0],
    "svm__gamma": ["scale", 0.03, 0.3],
    "svm__class_weight": [None, "balanced"],
}


class TrainingError(RuntimeError):
    """Training cannot produce a usable model from this data; the message says why."""


@dataclass(frozen=True)
class Split:
    """Train and held-out row indices, split by run seed."""

    train: np.ndarray
    holdout: np.ndarray
    holdout_seeds: tuple[int, ...]


def split_by_seed(
    seeds: np.ndarray, holdout_fraction: float, seed: int, labels: np.ndarray | None = None
) -> Split:
    """Hold out a seeded share of distinct run seeds (at least one, never all).

    With `labels`, the first of the seeded draws whose held-out and training runs both
    contain every class is taken, so each class has a held-out figure.
    """
    distinct = sorted({int(s) for s in seeds})
    if len(distinct) < 3:
        raise TrainingError(
            f"need runs with at least 3 distinct seeds to hold some out, got {distinct}"
        )
    n_out = min(len(distinct) - 2, max(1, round(len(distinct) * holdout_fraction)))
    rng = random.Random(f"twlb-holdout:{seed}")
    every = set() if labels is None else set(labels)
    for _ in range(200):
        held = sorted(rng.sample(distinct, n_out))
        mask = np.isin(seeds, held)
        if labels is None or (set(labels[mask]) == every and set(labels[~mask]) == every):
            break
    return Split(np.flatnonzero(~mask), np.flatnonzero(mask), tuple(held))


def evidence_windows(loaded: Dataset) -> tuple[Dataset, dict[str, int]]:
    """The windows the trust engine acts on (`trust.is_evidence`), and per class how many
    others were left out. A window the engine ignores (an ejected node nobody talks to)
    shows no sign of its class; learning from it teaches the model that a quiet healthy
    node looks faulty."""
    names = loaded.feature_names
    keep = np.array(
        [is_evidence(dict(zip(names, row, strict=True))) for row in loaded.X], dtype=bool
    )
    ds = loaded.subset(keep)
    if not len(ds):
        raise TrainingError("no window carries evidence (enough samples or a failure signal)")
    classes, counts = np.unique(loaded.y[~keep].astype(str), return_counts=True)
    return ds, {str(c): int(n) for c, n in zip(classes, counts, strict=True)}


def svm_pipeline(seed: int, memory: str | None = None) -> Pipeline:
    """Yeo-Johnson, scaling and an RBF SVM with Platt-scaled probabilities.

    The power transform spreads the ratios that sit near zero (a few audit mismatches)
    and squeezes the long tails of latency multiples, so that one RBF width fits both;
    `memory` caches the fitted transforms across a grid search's SVM settings.
    """
    with warnings.catch_warnings():
        # scikit-learn 1.9 deprecates probability=True; skl2onnx converts exactly this
        # form (Platt-scaled pairwise coupling): the class probabilities the trust engine reads.
        warnings.simplefilter("ignore", FutureWarning)
        svm = SVC(kernel="rbf", probability=True, random_state=seed)
    return Pipeline(
        [
            ("power", PowerTransformer(method="yeo-johnson", standardize=False)),
            ("scale", StandardScaler()),
            ("svm", svm),
        ],
        memory=memory,
    )


def comparison_models(seed: int) -> dict[str, ClassifierMixin]:
    return {
        "random_forest": RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1),
        "logistic_regression": Pipeline(
            [("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=2000))]
        ),
    }


def scores_for(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """Per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: truth)."""
    report = classification_report(
        y_true, y_pred, labels=list(classes), output_dict=True, zero_division=0
    )
    # Macro-F1 over the classes that occur (true or predicted), as scikit-learn's default
    # does: a class neither in the held-out runs nor predicted has no F1 to average.
    present = [c for c in classes if c in set(y_true) | set(y_pred)]
    return {
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
        "per_class": {
            c: {
                "precision": float(report[c]["precision"]),
                "recall": float(report[c]["recall"]),
                "f1": float(report[c]["f1-score"]),
                "support": int(report[c]["support"]),
            }
            for c in classes
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(classes)).tolist(),
    }


def _recall_if_seen(scores: dict, cls: str) -> float | None:
    m = scores["per_class"].get(cls)
    return m["recall"] if m and m["support"] else None


def heuristic_predictions(X: np.ndarray) -> list[str]:
    """The balancer's hand-written scorer on the same windows (its argmax class)."""
    from twlb.balancer.scoring import HeuristicScorer

    scorer = HeuristicScorer()
    proba = np.asarray(scorer.predict_proba(X))
    return [str(scorer.classes[i]) for i in np.argmax(proba, axis=1)]


def export_onnx(
    pipeline: Pipeline,
    feature_names: Sequence[str],
    version: str,
    data_digest: str,
    scores: dict[str, Any],
) -> bytes:
    """The fitted pipeline as ONNX (probabilities as a tensor) with TW-LB metadata."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    svm = pipeline.steps[-1][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skl2onnx reads probA_ and probB_
        model = to_onnx(
            pipeline,
            initial_types=[(INPUT_NAME, FloatTensorType([None, len(feature_names)]))],
            options={id(svm): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    model.doc_string = "TW-LB trust model: P(class | backend feature window)"
    meta = {
        META_NAME: MODEL_NAME,
        META_VERSION: version,
        META_FEATURES: json.dumps(list(feature_names)),
        META_CLASSES: json.dumps([str(c) for c in pipeline.classes_]),
        META_DATA_DIGEST: data_digest,
        META_SCORES: json.dumps(scores, sort_keys=True),
    }
    del model.metadata_props[:]
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model.SerializeToString()


def parity(scorer: OnnxScorer, pipeline: Pipeline, X: np.ndarray) -> dict[str, Any]:
    """onnxruntime vs scikit-learn on the same rows: label agreement, max |dp|."""
    rows = X.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sk_labels = pipeline.predict(rows)
        sk_proba = pipeline.predict_proba(rows)
    onnx_labels = scorer.labels(rows)
    onnx_proba = scorer.predict_proba(rows)
    return {
        "rows": len(rows),
        "labels_equal": bool(np.array_equal(sk_labels.astype(str), onnx_labels.astype(str))),
        "max_probability_difference": float(np.max(np.abs(sk_proba - onnx_proba))),
        "tolerance": PARITY_TOLERANCE,
    }


def plot_confusion(matrix: list[list[int]], classes: Sequence[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


@dataclass
class TrainingResult:
    model_path: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)


def train(
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    seed: int = 0,
    holdout_fraction: float = 0.25,
    folds: int = 4,
    feature_names: Sequence[str] | None = None,
    log: Any = print,
) -> TrainingResult:
    """Search, fit, compare, export and check; write model, report, PNG and card to `out`."""
    if feature_names is None:
        from twlb.balancer.features import FEATURE_NAMES

        feature_names = FEATURE_NAMES
    paths = [data] if isinstance(data, str | Path) else list(data)
    loaded = read_datasets(paths, feature_names)
    ds, dropped = evidence_windows(loaded)
    log(f"left out {sum(dropped.values())} windows without evidence {dropped}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_by_seed(ds.seed, holdout_fraction, seed, ds.y)
    X_train, y_train = ds.X[split.train], ds.y[split.train].astype(str)
    X_test, y_test = ds.X[split.holdout], ds.y[split.holdout].astype(str)
    classes = sorted(set(ds.y.astype(str)))
    missing = sorted(set(classes) - set(y_train))
    if missing:
        raise TrainingError(f"training runs hold no windows of classes {missing}")
    groups = ds.run_id[split.train]
    n_folds = min(folds, len(set(groups)))
    if n_folds < 2:
        raise TrainingError("need at least 2 training runs for grouped cross-validation")
    log(
        f"{len(ds)} windows from {len(set(ds.run_id))} runs; training on {len(y_train)}, "
        f"holding out {len(y_test)} (seeds {list(split.holdout_seeds)})"
    )
    with tempfile.TemporaryDirectory(prefix="twlb-train-cache-") as cache:
        search = GridSearchCV(
            svm_pipeline(seed, memory=cache),
            SVM_GRID,
            scoring="f1_macro",
            cv=GroupKFold(n_splits=n_folds),
            n_jobs=1,
            refit=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            search.fit(X_train.astype(np.float32), y_train, groups=groups)
    best: Pipeline = search.best_estimator_.set_params(memory=None)
    log(f"best SVM {search.best_params_} (cv macro-F1 {search.best_score_:.4f})")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        svm_pred = best.predict(X_test.astype(np.float32)).astype(str)
    results = {"svm": scores_for(y_test, svm_pred, classes)}
    results["heuristic"] = scores_for(y_test, heuristic_predictions(X_test), classes)
    for name, model in comparison_models(seed).items():
        model.fit(X_train, y_train)
        results[name] = scores_for(y_test, model.predict(X_test).astype(str), classes)
    for name, r in results.items():
        log(f"held-out macro-F1 {name}: {r['macro_f1']:.4f}")

    summary = {
        "macro_f1": results["svm"]["macro_f1"],
        "byzantine_recall": _recall_if_seen(results["svm"], "byzantine"),
        "heuristic_macro_f1": results["heuristic"]["macro_f1"],
        "holdout_windows": len(y_test),
    }
    version = f"1.{seed}+{ds.digest[:12]}"
    onnx_bytes = export_onnx(best, feature_names, version, ds.digest, summary)
    scorer = OnnxScorer.from_bytes(onnx_bytes, "exported model", feature_names)
    check = parity(scorer, best, X_test)
    if not check["labels_equal"] or check["max_probability_difference"] > PARITY_TOLERANCE:
        raise TrainingError(f"ONNX export disagrees with scikit-learn: {check}")
    model_path = out_dir / TRAINED_MODEL_FILE
    model_path.write_bytes(onnx_bytes)
    plot_confusion(
        results["svm"]["confusion_matrix"],
        classes,
        f"{MODEL_NAME} on held-out runs (macro-F1 {summary['macro_f1']:.3f})",
        out_dir / CONFUSION_PNG,
    )
    report = {
        "model": {"name": MODEL_NAME, "version": version, "file": TRAINED_MODEL_FILE},
        "data": {
            "file": str(ds.path),
            "digest": ds.digest,
            "windows": len(loaded),
            "evidence_windows": len(ds),
            "left_out_without_evidence": dropped,
            "runs": len(set(ds.run_id)),
            "metadata": dict(ds.metadata),
            "class_counts": {c: int(np.sum(ds.y == c)) for c in classes},
        },
        "seed": seed,
        "split": {
            "holdout_fraction": holdout_fraction,
            "holdout_seeds": list(split.holdout_seeds),
            "train_seeds": sorted({int(s) for s in ds.seed[split.train]}),
            "train_windows": len(y_train),
            "holdout_windows": len(y_test),
        },
        "feature_names": list(feature_names),
        "classes": classes,
        "search": {
            "grid": SVM_GRID,
            "folds": n_folds,
            "best_params": dict(search.best_params_),
            "cv_macro_f1": float(search.best_score_),
        },
        "holdout": results,
        "summary": summary,
        "parity": check,
    }
    report_path = out_dir / REPORT_FILE
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    from twlb.ml.card import write_card

    write_card(out_dir / CARD_FILE, report)
    log(f"wrote {model_path}, {report_path}, {out_dir / CONFUSION_PNG}, {out_dir / CARD_FILE}")
    return TrainingResult(model_path, report_path, report)
