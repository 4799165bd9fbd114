"""Training: split by run seed, grouped search, comparison, export, report and model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from twlb.balancer.onnx_scorer import OnnxScorer
from twlb.ml.card import TARGETS_BEGIN, TARGETS_END, write_targets
from twlb.ml.dataset import SHIPPED_DATA
from twlb.ml.train import REPRODUCTION_TOLERANCE, TrainingError, split_by_seed

from twlb.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "ml" / "models"


def test_held_out_runs_are_a_seeded_share_of_seeds_never_trained_on() -> None:
    seeds = np.repeat(np.arange(12), 5)
    a = split_by_seed(seeds, 0.25, seed=3)
    again = split_by_seed(seeds, 0.25, seed=3)
    assert a.holdout_seeds == again.holdout_seeds and np.array_equal(a.train, again.train)
    assert len(a.holdout_seeds) == 3
    assert not set(seeds[a.train]) & set(a.holdout_seeds)
    assert set(seeds[a.holdout]) == set(a.holdout_seeds)
    assert len(a.train) + len(a.holdout) == len(seeds)
    assert split_by_seed(seeds, 0.25, seed=4).holdout_seeds != a.holdout_seeds
    with pytest.raises(TrainingError, match="at least 3 distinct seeds"):
        split_by_seed(np.array([1, 1, 2]), 0.25, seed=0)


def test_with_labels_both_sides_of_the_split_hold_every_class() -> None:
    seeds = np.repeat(np.arange(8), 2)
    # Only runs 2 and 5 saw a byzantine node.
    labels = np.array(["healthy", "error"] * 8, dtype=object)
    labels[[4, 10]] = "byzantine"
    for seed in range(10):
        split = split_by_seed(seeds, 0.25, seed, labels)
        assert set(labels[split.holdout]) == set(labels[split.train]) == set(labels)


def test_twlb_train_reproduces_the_shipped_model_with_report_png_and_card(tmp_path: Path) -> None:
    shipped_report = json.loads((SHIPPED / "training_report.json").read_text())
    result = CliRunner().invoke(
        main,
        [
            "train",
            *(arg for path in SHIPPED_DATA for arg in ("--data", str(path))),
            "--out",
            str(tmp_path),
            "--seed",
            str(shipped_report["seed"]),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert set(report["holdout"]) == {"svm", "heuristic", "random_forest", "logistic_regression"}
    for scores in report["holdout"].values():
        assert 0.0 <= scores["macro_f1"] <= 1.0
        assert set(scores["per_class"]) == set(report["classes"])
        assert np.sum(scores["confusion_matrix"]) == report["split"]["holdout_windows"]
    assert report["parity"]["labels_equal"]
    assert report["holdout"] == shipped_report["holdout"]
    assert report["search"]["best_params"] == shipped_report["search"]["best_params"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert report["model"]["version"] in card and report["data"]["digest"] in card
    new = OnnxScorer.load(tmp_path / "trust-svm.onnx")
    old = OnnxScorer.load(SHIPPED / "trust-svm.onnx")
    assert new.version == old.version
    X = np.random.default_rng(0).uniform(0, 2, size=(50, len(new.feature_names)))
    np.testing.assert_allclose(
        new.predict_proba(X), old.predict_proba(X), rtol=0, atol=REPRODUCTION_TOLERANCE
    )

    write_targets(tmp_path / "MODEL_CARD.md", "- macro-F1: measured")
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"{TARGETS_BEGIN}\n- macro-F1: measured\n{TARGETS_END}" in card


def test_train_rejects_a_file_that_is_not_a_dataset_with_status_2(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("run_id,label\n")
    result = CliRunner().invoke(main, ["train", "--data", str(bogus), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a readable Parquet file" in result.output
