"""The model card (MODEL_CARD.md): rendered from a training report, targets filled in later.

`write_card` renders what training knows; `write_targets` replaces the card's targets
section with figures measured by bench/ml_targets.py, leaving the rest untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twlb.balancer.trust import MIN_SAMPLES

TARGETS_BEGIN = "<!-- targets:begin -->"
TARGETS_END = "<!-- targets:end -->"


def _per_class_table(result: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for cls, m in result["per_class"].items():
        lines.append(
            f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        )
    return lines


def _confusion_table(matrix: list[list[int]], classes: list[str]) -> list[str]:
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |"]
    lines.append("|---" * (len(classes) + 1) + "|")
    for cls, row in zip(classes, matrix, strict=True):
        lines.append(f"| {cls} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def render_card(report: dict[str, Any]) -> str:
    model, data, split = report["model"], report["data"], report["split"]
    holdout = report["holdout"]
    meta = data.get("metadata", {})
    out = [
        f"# Model card: {model['name']} {model['version']}",
        "",
        "Predicts, from one backend's feature window as the balancer sees it, whether the",
        "backend is healthy or delayed, crashing, erroring or lying (byzantine). The balancer",
        "turns P(healthy) into the backend's trust weight.",
        "",
        "## Model",
        f"- File: `{model['file']}` (ONNX, input `features` float32 [n, "
        f"{len(report['feature_names'])}], outputs `label` and `probabilities` [n, "
        f"{len(report['classes'])}]).",
        "- Pipeline (scikit-learn): PowerTransformer (Yeo-Johnson: spreads ratios near zero, "
        "squeezes latency tails) + StandardScaler + SVC (RBF kernel, Platt-scaled "
        "probabilities), exported with skl2onnx (zipmap off).",
        f"- Hyperparameters (GridSearchCV, GroupKFold by run id, {report['search']['folds']} "
        f"folds, scoring macro-F1): `{report['search']['best_params']}`, cv macro-F1 "
        f"{report['search']['cv_macro_f1']:.4f}.",
        f"- Features, in input order: {', '.join(f'`{f}`' for f in report['feature_names'])}.",
        f"- Classes, in output order: {', '.join(f'`{c}`' for c in report['classes'])}.",
        "",
        "## Data",
        f"- Training data digest (SHA-256 of the Parquet file): `{data['digest']}`.",
        f"- {data['windows']} windows from {data['runs']} runs; "
        f"{data['evidence_windows']} carry evidence and are used, per "
        "class: "
        + ", ".join(f"{c} {n}" for c, n in data["class_counts"].items())
        + ". Left out, as the trust engine ignores them (fewer than "
        f"{MIN_SAMPLES} requests plus audits and no failure signal, e.g. a node ejected and "
        f"idle): {data['left_out_without_evidence'] or 'none'}.",
        f"- Collected by `twlb collect` ({meta.get('source', 'unknown')} source, window "
        f"{meta.get('window_s', '?')} s): {meta.get('description', '')}",
        f"- Held-out runs (seeds never used in training): {split['holdout_seeds']}, "
        f"{split['holdout_windows']} windows; training runs: {len(split['train_seeds'])} "
        f"seeds, {split['train_windows']} windows. Split seed {report['seed']}.",
        "",
        "## Held-out results",
        "| model | macro-F1 | accuracy |",
        "|---|---|---|",
    ]
    for name, r in holdout.items():
        out.append(f"| {name} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} |")
    out += [
        "",
        "The SVM's figures here use its own label (the pairwise vote); the targets below use",
        "the most probable class of the ONNX probabilities, which is what the balancer uses.",
        "",
        "### SVM per class",
        "",
        *_per_class_table(holdout["svm"]),
        "",
    ]
    out += ["### SVM confusion matrix (held-out)", ""]
    out += _confusion_table(holdout["svm"]["confusion_matrix"], report["classes"])
    out += ["", "![confusion matrix](confusion_matrix.png)", ""]
    out += ["### Heuristic scorer per class", "", *_per_class_table(holdout["heuristic"]), ""]
    p = report["parity"]
    out += [
        "## ONNX parity",
        f"onnxruntime vs scikit-learn on the {p['rows']} held-out windows: labels equal: "
        f"{p['labels_equal']}, largest probability difference "
        f"{p['max_probability_difference']:.2e} (tolerance {p['tolerance']:.0e}).",
        "",
        "## Targets",
        TARGETS_BEGIN,
        "Not measured for this model yet: run `.venv/bin/python bench/ml_targets.py`.",
        TARGETS_END,
        "",
        "## Limits",
        f"- The held-out figures rest on {split['holdout_windows']} windows from "
        f"{len(split['holdout_seeds'])} runs; a perfect score on them bounds the error rate "
        "only roughly (one mistake would cost about "
        f"{100 / max(1, split['holdout_windows']):.1f} points of accuracy).",
        "- Trained on loopback clusters of the embedded lab: fault parameters and loads",
        "  outside the collected ranges (see the data description) are untested.",
        "- `lie-latency` is labelled `delay` (twlb.spec.FAULT_CLASS); `flapping` nodes are",
        "  not collected (their healthy periods would carry the `error` label); windows",
        "  that straddle a fault switch or a kill are left out.",
        "- Byzantine detection relies on the balancer's audits; with an audit fraction",
        "  far below the collection's, fewer mismatches are seen per window.",
        "",
        "## Reproduce",
        "`make train` (collect with the seed, then train); training alone on the shipped",
        "data: `twlb train --data ml/data/train.parquet --data ml/data/train-small.parquet "
        "--out ml/models`.",
        "",
    ]
    return "\n".join(out)


def write_card(path: str | Path, report: dict[str, Any]) -> Path:
    p = Path(path)
    p.write_text(render_card(report))
    return p


def write_targets(path: str | Path, section: str) -> Path:
    """Replace the text between the targets markers of an existing card."""
    p = Path(path)
    text = p.read_text()
    start, end = text.find(TARGETS_BEGIN), text.find(TARGETS_END)
    if start < 0 or end < start:
        raise ValueError(f"{p}: no targets section ({TARGETS_BEGIN} ... {TARGETS_END})")
    p.write_text(text[: start + len(TARGETS_BEGIN)] + "\n" + section.strip() + "\n" + text[end:])
    return p
