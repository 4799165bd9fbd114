"""The shipped trust model is the default wherever a balancer starts; 'heuristic' picks the other."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from twlb.balancer.settings import BalancerSettings, shipped_model

from twlb.cli import main

SHIPPED = Path(__file__).resolve().parents[1] / "ml" / "models" / "trust-svm.onnx"


def test_a_balancer_scores_with_the_shipped_model_unless_told_otherwise() -> None:
    assert shipped_model() is not None and shipped_model().read_bytes() == SHIPPED.read_bytes()
    assert BalancerSettings().model == shipped_model()
    assert BalancerSettings(model="shipped").model == shipped_model()
    assert BalancerSettings(model="heuristic").model is None
    assert BalancerSettings(model=str(SHIPPED)).model == SHIPPED
    with pytest.raises(ValidationError, match="does not exist"):
        BalancerSettings(model="/no/such/model.onnx")


def test_twlb_balancer_help_shows_the_shipped_default() -> None:
    result = CliRunner().invoke(main, ["balancer", "--help"])
    assert result.exit_code == 0, result.output
    assert "[default: shipped]" in " ".join(result.output.split())
