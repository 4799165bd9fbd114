"""A live balancer swaps its ONNX model without a restart and refuses bad files, keeping its own."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import onnx
from click.testing import CliRunner
from tenacity import RetryError, Retrying, stop_after_delay, wait_fixed
from twlb.balancer.features import FEATURE_NAMES
from twlb.balancer.onnx_scorer import META_FEATURES, META_VERSION

from twlb.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "ml" / "models" / "trust-svm.onnx"


def _model_bytes(**changes: str) -> bytes:
    model = onnx.load_model(MODEL)
    for p in model.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    return model.SerializeToString()


def _replace(path: Path, data: bytes) -> None:
    """Write next to the file, then rename over it, as a deploy or a ConfigMap update does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout), wait=wait_fixed(0.1), retry_error_cls=RetryError
        ):
            with attempt:
                assert predicate(), what
    except RetryError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _failures(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r"^twlb_balancer_model_load_failures_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


def test_balancer_hot_swaps_a_new_model_and_keeps_it_over_corrupt_and_mismatched_files(
    spawn, tmp_path: Path
) -> None:
    model = tmp_path / "trust.onnx"
    model.write_bytes(MODEL.read_bytes())
    quiet = ("--log-level", "warning")
    _, backend = spawn("backend", "--no-simulation", "--node-id", "a", *quiet)
    proc, url = spawn(
        "balancer", "--backend", backend, "--policy", "trust", "--model", str(model), *quiet
    )
    first = httpx.get(url + "/trust", timeout=5).json()["model"]
    assert first["name"] == "trust-svm" and first["digest"] and first["version"]

    _replace(model, _model_bytes(**{META_VERSION: "reloaded-2"}))
    _wait_for(
        lambda: httpx.get(url + "/trust", timeout=5).json()["model"]["version"] == "reloaded-2",
        "the new model in /trust",
    )
    assert _failures(url) == 0.0

    model.write_bytes(b"\x08\x07 this is not a model")
    _wait_for(lambda: _failures(url) == 1.0, "the corrupt file to be refused")
    wrong = json.dumps(list(reversed(FEATURE_NAMES)))
    _replace(model, _model_bytes(**{META_VERSION: "reordered", META_FEATURES: wrong}))
    _wait_for(lambda: _failures(url) == 2.0, "the mismatched model to be refused")

    report = httpx.get(url + "/trust", timeout=5).json()
    assert report["model"]["version"] == "reloaded-2"
    assert proc.alive(), "the balancer restarted or died"
    log = proc.log_path.read_text()
    assert "not a valid ONNX model" in log and "order differs" in log


def test_balancer_will_not_start_with_a_refused_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(_model_bytes(**{META_FEATURES: json.dumps(list(FEATURE_NAMES[:3]))}))
    result = CliRunner().invoke(main, ["balancer", "--port", "1", "--model", str(bad)])
    assert result.exit_code == 2, result.output
    assert "feature names do not match" in result.output
