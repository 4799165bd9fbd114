"""How experiments read the balancer's /trust rows."""

from __future__ import annotations

import pytest

from twlb.experiment import _flagged


@pytest.mark.parametrize(
    ("row", "flagged"),
    [
        ({"state": "trusted", "held": False, "health": {"state": "up"}}, False),
        ({"state": "probation", "health": {"state": "up"}}, False),
        ({"state": "ejected", "held": False, "health": {"state": "up"}}, True),
        ({"state": "trusted", "held": True, "health": {"state": "up"}}, True),  # the floor
        ({"state": "trusted", "held": False, "health": {"state": "down"}}, True),
        ({"state": "trusted", "health": "unhealthy"}, True),
    ],
)
def test_a_backend_counts_as_detected_once_the_balancer_judges_it_bad(
    row: dict, flagged: bool
) -> None:
    assert _flagged(row) is flagged
