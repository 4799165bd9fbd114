"""Benchmark: the trust model's targets, measured, printed, written to JSON and the model card.

1. Quality on held-out runs: the shipped ONNX model and the heuristic scorer on the runs
   whose seeds training never saw (the split recorded in training_report.json):
   macro-F1 >= 0.97, byzantine recall >= 0.99, SVM ahead of the heuristic.
2. Scoring 100 backends: the median of many batched onnxruntime calls, under 1 ms.
3. Live detection: backends and a balancer with `--policy trust --model` on loopback,
   `twlb load` at 200 req/s; a fault is switched on one healthy node at a time through
   /control/fault and the time until its weight falls below the ejection threshold is
   measured in windows (target: within two).

    .venv/bin/python bench/ml_targets.py
    .venv/bin/python bench/ml_targets.py --skip-live     # quality and speed only

Writes reports/bench/ml_targets.json and the targets section of ml/models/MODEL_CARD.md.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from twlb.balancer.features import FEATURE_NAMES
from twlb.balancer.onnx_scorer import OnnxScorer
from twlb.balancer.settings import TRAINED_MODEL_FILE
from twlb.balancer.trust import TrustEngine
from twlb.chaos.run import driven_load
from twlb.ml.card import write_targets
from twlb.ml.dataset import SHIPPED_DATA, read_datasets
from twlb.ml.train import evidence_windows, heuristic_predictions, scores_for, split_by_seed
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.options import FiniteFloat
from twlb.spec import FaultSpec, FaultType

ROOT = Path(__file__).resolve().parents[1]
TARGET_MACRO_F1 = 0.97
TARGET_BYZANTINE_RECALL = 0.99
TARGET_SCORING_MS = 1.0
TARGET_WINDOWS = 2.0
EJECT_BELOW = inspect.signature(TrustEngine).parameters["eject_below"].default


def quality(model_dir: Path, data: Sequence[Path]) -> dict[str, Any]:
    report = json.loads((model_dir / "training_report.json").read_text())
    loaded = read_datasets(data, FEATURE_NAMES)
    if loaded.digest != report["data"]["digest"]:
        raise click.ClickException(f"{data} is not the data {model_dir} was trained on")
    ds, _ = evidence_windows(loaded)
    split = split_by_seed(ds.seed, report["split"]["holdout_fraction"], report["seed"], ds.y)
    X, y = ds.X[split.holdout], ds.y[split.holdout].astype(str)
    scorer = OnnxScorer.load(model_dir / TRAINED_MODEL_FILE)
    classes = report["classes"]
    svm = scores_for(y, scorer.predict(X), classes)
    heuristic = scores_for(y, heuristic_predictions(X), classes)
    return {
        "holdout_seeds": list(split.holdout_seeds),
        "holdout_windows": len(y),
        "svm_macro_f1": svm["macro_f1"],
        "byzantine_recall": svm["per_class"]["byzantine"]["recall"],
        "heuristic_macro_f1": heuristic["macro_f1"],
        "svm_per_class": svm["per_class"],
    }


def scoring_speed(model_dir: Path, data: Sequence[Path], calls: int = 3000) -> dict[str, Any]:
    scorer = OnnxScorer.load(model_dir / TRAINED_MODEL_FILE)
    X = read_datasets(data, FEATURE_NAMES).X
    rows = X[np.random.default_rng(0).integers(0, len(X), size=100)]
    for _ in range(200):
        scorer.predict_proba(rows)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        scorer.predict_proba(rows)
        times.append(time.perf_counter() - t)
    ms = sorted(t * 1000 for t in times)
    return {
        "backends": 100,
        "calls": calls,
        "median_ms": statistics.median(ms),
        "p99_ms": ms[int(0.99 * len(ms)) - 1],
    }


def _trust_row(balancer: str, backend: str) -> dict[str, Any]:
    report = httpx.get(balancer + "/trust", timeout=5).json()
    return next(b for b in report["backends"] if b["url"] == backend)


def live_detection(model: Path, window_s: float, rate: float, workdir: Path) -> dict[str, Any]:
    """Switch faults on healthy nodes one at a time; time until each weight < EJECT_BELOW."""
    token = secrets.token_urlsafe(12)
    scenarios = [
        FaultSpec(type=FaultType.ERROR, probability=1.0),
        FaultSpec(type=FaultType.BYZANTINE, probability=1.0),
        FaultSpec(type=FaultType.DELAY, probability=1.0, delay_ms=2000),
        FaultSpec(type=FaultType.ERROR, probability=0.5),
        FaultSpec(type=FaultType.BYZANTINE, probability=0.5),
    ]
    n_nodes = len(scenarios) + 3
    procs: list[ManagedProcess] = []
    results = []
    stack = contextlib.ExitStack()
    try:
        nodes = []
        for i in range(n_nodes):
            port = free_port()
            argv = twlb_argv(
                "backend", "--host", "127.0.0.1", "--port", str(port),
                "--node-id", f"bench-{i}", "--seed", str(1000 + i),
                "--control-token", token, "--log-level", "warning",
            )  # fmt: skip
            procs.append(ManagedProcess(argv, log_path=workdir / f"node-{i}.log").start())
            nodes.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, nodes, strict=True):
            proc.wait_ready(url + "/healthz")
        port = free_port()
        balancer = f"http://127.0.0.1:{port}"
        argv = twlb_argv(
            "balancer", "--host", "127.0.0.1", "--port", str(port), "--policy", "trust",
            "--model", str(model), "--window", repr(window_s), "--log-level", "warning",
            *(a for n in nodes for a in ("--backend", n)),
        )  # fmt: skip
        procs.append(ManagedProcess(argv, log_path=workdir / "balancer.log").start())
        procs[-1].wait_ready(balancer + "/healthz")
        duration = 3 * window_s + len(scenarios) * (2.5 * window_s + 2) + 10
        load = stack.enter_context(driven_load(balancer, rate, duration, workdir))
        time.sleep(3 * window_s)  # every node trusted on a full window of healthy traffic
        lowest_healthy = 1.0  # the never-faulted nodes' lowest weight (false alarms)
        for i, fault in enumerate(scenarios):
            node = nodes[i]
            before = _trust_row(balancer, node)
            r = httpx.put(
                node + "/control/fault",
                json=fault.model_dump(mode="json", by_alias=True),
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            )
            r.raise_for_status()
            switched = time.monotonic()
            detected = None
            while time.monotonic() - switched < 2.5 * window_s + 2:
                row = _trust_row(balancer, node)
                if row["weight"] < EJECT_BELOW:
                    detected = time.monotonic() - switched
                    break
                time.sleep(0.1)
            for healthy in nodes[len(scenarios) :]:
                lowest_healthy = min(lowest_healthy, _trust_row(balancer, healthy)["weight"])
            results.append(
                {
                    "fault": fault.type.value,
                    "probability": fault.probability,
                    "weight_before": before["weight"],
                    "seconds_to_below_threshold": detected,
                    "windows": None if detected is None else detected / window_s,
                    "predicted": max(row["probabilities"], key=row["probabilities"].get),
                }
            )
    finally:
        stack.close()  # the load first, so its report is written
        for p in procs:
            p.stop()
    loaded = json.loads(load.report_path.read_text()) if load.report_path.exists() else None
    worst = [r["windows"] for r in results]
    return {
        "rate": rate,
        "window_s": window_s,
        "eject_below": EJECT_BELOW,
        "scenarios": results,
        "worst_windows": None if None in worst else max(worst),
        "healthy_nodes_lowest_weight": lowest_healthy,
        "load": loaded and {k: loaded.get(k) for k in ("sent", "achieved_rate")},
    }


def card_section(res: dict[str, Any], command: str) -> str:
    q, s, live = res["quality"], res["scoring"], res.get("live")
    lines = [
        f"Measured by `{command}` on {res['machine']} ({res['measured_at']}):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| macro-F1 on held-out runs >= {TARGET_MACRO_F1} | {q['svm_macro_f1']:.4f} "
        f"| {res['met']['macro_f1']} |",
        f"| byzantine recall >= {TARGET_BYZANTINE_RECALL} | {q['byzantine_recall']:.4f} "
        f"| {res['met']['byzantine_recall']} |",
        f"| SVM ahead of the heuristic (macro-F1 {q['heuristic_macro_f1']:.4f}) | "
        f"{q['svm_macro_f1'] - q['heuristic_macro_f1']:+.4f} | {res['met']['ahead_of_heuristic']} |",
        f"| scoring 100 backends < {TARGET_SCORING_MS} ms per tick | median {s['median_ms']:.3f} ms "
        f"(p99 {s['p99_ms']:.3f}) | {res['met']['scoring']} |",
    ]
    if live:
        per = ", ".join(
            f"{r['fault']}@{r['probability']}: "
            + ("not detected" if r["windows"] is None else f"{r['windows']:.2f}")
            for r in live["scenarios"]
        )
        worst = live["worst_windows"]
        lines.append(
            f"| weight below {live['eject_below']} within {TARGET_WINDOWS:.0f} windows after a "
            f"fault switch at {live['rate']:.0f} req/s | worst "
            f"{'n/a' if worst is None else f'{worst:.2f}'} windows ({per}) | {res['met']['live']} |"
        )
        lines.append(
            f"| (never-faulted nodes' lowest weight meanwhile) | "
            f"{live['healthy_nodes_lowest_weight']:.3f} | |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              default=ROOT / "ml" / "models")  # fmt: skip
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              default=SHIPPED_DATA, help="The model's training data (repeatable).")  # fmt: skip
@click.option("--rate", type=FiniteFloat(1, 2000), default=200.0)
@click.option("--window", type=FiniteFloat(0.5, 60), default=5.0)
@click.option("--skip-live", is_flag=True, help="Quality and scoring speed only.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=ROOT / "reports" / "bench" / "ml_targets.json")  # fmt: skip
@click.option("--no-card", is_flag=True, help="Do not write the model card's targets section.")
def main(
    model_dir: Path, data: tuple[Path, ...], rate: float, window: float, skip_live: bool, out: Path,
    no_card: bool,
) -> None:  # fmt: skip
    """Measure the trust model's targets."""
    console = Console()
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {__import__('os').cpu_count()} cores",
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model_version": OnnxScorer.load(model_dir / TRAINED_MODEL_FILE).version,
    }
    res["quality"] = quality(model_dir, data)
    res["scoring"] = scoring_speed(model_dir, data)
    if not skip_live:
        with tempfile.TemporaryDirectory(prefix="twlb-ml-bench-") as tmp:
            res["live"] = live_detection(model_dir / TRAINED_MODEL_FILE, window, rate, Path(tmp))
    q, s = res["quality"], res["scoring"]
    res["met"] = {
        "macro_f1": q["svm_macro_f1"] >= TARGET_MACRO_F1,
        "byzantine_recall": q["byzantine_recall"] >= TARGET_BYZANTINE_RECALL,
        "ahead_of_heuristic": q["svm_macro_f1"] > q["heuristic_macro_f1"],
        "scoring": s["median_ms"] < TARGET_SCORING_MS,
    }
    if "live" in res:
        worst = res["live"]["worst_windows"]
        res["met"]["live"] = worst is not None and worst <= TARGET_WINDOWS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    table = Table(title=f"trust model {res['model_version']}")
    for col in ("target", "measured", "met"):
        table.add_column(col)
    table.add_row("held-out macro-F1", f"{q['svm_macro_f1']:.4f}", str(res["met"]["macro_f1"]))
    table.add_row(
        "byzantine recall", f"{q['byzantine_recall']:.4f}", str(res["met"]["byzantine_recall"])
    )
    table.add_row(
        "heuristic macro-F1", f"{q['heuristic_macro_f1']:.4f}",
        str(res["met"]["ahead_of_heuristic"]),
    )  # fmt: skip
    table.add_row(
        "scoring 100 backends", f"{s['median_ms']:.3f} ms median", str(res["met"]["scoring"])
    )
    if "live" in res:
        for r in res["live"]["scenarios"]:
            w = "not detected" if r["windows"] is None else f"{r['windows']:.2f} windows"
            table.add_row(f"live {r['fault']}@{r['probability']}", w, "")
    console.print(table)
    console.print(f"wrote {out}")
    if not no_card:
        command = ".venv/bin/python bench/ml_targets.py" + (" --skip-live" if skip_live else "")
        write_targets(model_dir / "MODEL_CARD.md", card_section(res, command))
        console.print(f"updated {model_dir / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
