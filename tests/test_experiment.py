"""How experiments read the balancer's /trust rows."""

from __future__ import annotations

import pytest
from twlb.balancer.health import HealthState
from twlb.balancer.trust import TrustState
from twlb.orchestration.experiment import FLAGGED_STATES, _flagged


@pytest.mark.parametrize(
    ("row", "flagged"),
    [
        ({"state": "trusted", "held": False, "health": {"state": "healthy"}}, False),
        ({"state": "probation", "health": {"state": "healthy"}}, False),
        ({"state": "ejected", "held": False, "health": {"state": "healthy"}}, True),
        # held by the floor: still in rotation, so not detected
        ({"state": "trusted", "held": True, "health": {"state": "healthy"}}, False),
        ({"state": "trusted", "held": False, "health": {"state": "unhealthy"}}, True),
        ({"state": "trusted", "health": "unhealthy"}, True),
    ],
)
def test_a_backend_counts_as_detected_once_it_is_out_of_rotation(row: dict, flagged: bool) -> None:
    assert _flagged(row) is flagged


def test_the_flagged_states_are_states_the_balancer_reports() -> None:
    reported = {s.value for s in TrustState} | {s.value for s in HealthState}
    assert reported >= FLAGGED_STATES
