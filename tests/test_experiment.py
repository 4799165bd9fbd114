"""How experiments read the balancer's /trust rows: "detected" is out of that policy's rotation."""

from __future__ import annotations

import re

import pytest
from rich.console import Console
from twlb.balancer.health import HealthState
from twlb.balancer.trust import TrustState
from twlb.orchestration.experiment import Phase, _detections, _flagged, _held, rich_table
from twlb.orchestration.runtime import HEALTH_UNHEALTHY, TRUST_EJECTED

from twlb.spec import NodeClass

HEALTHY = {"state": "healthy"}
UNHEALTHY = {"state": "unhealthy"}


@pytest.mark.parametrize(
    ("row", "policy", "flagged"),
    [
        ({"state": "trusted", "held": False, "health": HEALTHY}, "trust", False),
        ({"state": "probation", "health": HEALTHY}, "trust", False),
        ({"state": "ejected", "held": False, "health": HEALTHY}, "trust", True),
        # held by the floor: still in rotation, so not detected
        ({"state": "trusted", "held": True, "health": HEALTHY}, "trust", False),
        ({"state": "trusted", "held": False, "health": UNHEALTHY}, "trust", True),
        ({"state": "trusted", "health": "unhealthy"}, "trust", True),
        ({"state": "trusted", "health": HEALTHY, "up": False}, "trust", True),
        # Trust ejected it, but round robin (and the others that do not route on trust)
        # still sends it requests: not detected.
        ({"state": "ejected", "health": HEALTHY}, "round-robin", False),
        ({"state": "ejected", "health": HEALTHY}, "p2c-ewma", False),
        ({"state": "ejected", "health": HEALTHY}, "least-connections", False),
        # Failing health takes a backend out of every policy's rotation.
        ({"state": "trusted", "health": UNHEALTHY}, "round-robin", True),
        # outlier-ejection's own ejections count under it, trust's do not.
        ({"state": "ejected", "health": HEALTHY, "policy": {"ejected": False}},
         "outlier-ejection", False),
        ({"state": "trusted", "health": HEALTHY, "policy": {"ejected": True}},
         "outlier-ejection", True),
        # The oracle skips what the truth calls faulty.
        ({"state": "trusted", "health": HEALTHY, "policy": {"truth": "byzantine"}}, "oracle", True),
        ({"state": "ejected", "health": HEALTHY, "policy": {"truth": "healthy"}}, "oracle", False),
    ],
)  # fmt: skip
def test_a_backend_counts_as_detected_once_out_of_that_policys_rotation(
    row: dict, policy: str, flagged: bool
) -> None:
    assert _flagged(row, policy) is flagged


def test_only_trusts_rotation_is_held_by_the_floor() -> None:
    row = {"state": "trusted", "held": True, "health": HEALTHY}
    assert _held(row, "trust") is True
    assert _held(row, "round-robin") is False


def test_the_words_read_are_words_the_balancer_reports() -> None:
    assert TRUST_EJECTED in {s.value for s in TrustState}
    assert HEALTH_UNHEALTHY in {s.value for s in HealthState}


def _timeline(policy: str) -> list[dict]:
    """A phase as the demo records it (the recorded round-robin phase, in small): two liars
    trust ejects at 1.5 s and 9.1 s while their health stays good, a slow node failing
    health from 2.5 s, a node killed at 12.7 s."""
    liar, late_liar, slow, killed = "http://n1", "http://n0", "http://n3", "http://n2"

    def row(url: str, state: str, health: dict) -> dict:
        raw = {"url": url, "state": state, "health": health, "held": False}
        return {"url": url, "flagged": _flagged(raw, policy), "held": _held(raw, policy)}

    timeline = []
    for t in (0.5, 1.5, 2.5, 9.1, 13.2, 20.0):
        timeline.append({"t": t, "backends": [
            row(liar, "ejected" if t >= 1.5 else "probation", HEALTHY),
            row(late_liar, "ejected" if t >= 9.1 else "trusted", HEALTHY),
            row(slow, "ejected" if t >= 2.5 else "probation", UNHEALTHY if t >= 2.5 else HEALTHY),
            row(killed, "trusted", UNHEALTHY if t >= 13.2 else HEALTHY),
        ]})  # fmt: skip
    return timeline


ONSETS = {
    "http://n1": (0.0, NodeClass.BYZANTINE, "from start"),
    "http://n3": (0.0, NodeClass.DELAY, "from start"),
    "http://n0": (8.6, NodeClass.BYZANTINE, "node-0 -> byzantine"),
    "http://n2": (12.7, NodeClass.CRASH, "kill node-2"),
}


def test_round_robin_detects_only_what_health_takes_out_trust_detects_the_liars() -> None:
    detected = {
        policy: {d["url"]: d["detect_s"] for d in _detections(_timeline(policy), ONSETS)}
        for policy in ("round-robin", "trust")
    }
    # Round robin kept routing to both liars to the end: they are not detected.
    assert detected["round-robin"] == {
        "http://n1": None, "http://n3": 2.5, "http://n0": None, "http://n2": 0.5,
    }  # fmt: skip
    assert detected["trust"] == {
        "http://n1": 1.5, "http://n3": 2.5, "http://n0": 0.5, "http://n2": 0.5,
    }  # fmt: skip
    phase = Phase("s", "round-robin", {"sent": 100}, detections=_detections(
        _timeline("round-robin"), ONSETS))  # fmt: skip
    summary = phase.summary()
    assert (summary["detected"], summary["faults"]) == (2, 4)


def _summaries() -> list[dict]:
    out = []
    for policy in ("trust", "outlier-ejection", "p2c-ewma", "least-connections",
                   "round-robin", "oracle"):  # fmt: skip
        detections = _detections(_timeline(policy), ONSETS)
        p = Phase("standard-mix+onset", policy, {
            "sent": 2500, "correct": 1300, "wrong": 1177, "failed": 23,
            "latency_ms": {"p50": 1.7, "p95": 2004.9, "p99": 2011.3},
        }, detections=detections)  # fmt: skip
        out.append(p.summary())
    # The same scenario with Envoy routing, steered by TW-LB: one more row.
    envoy = Phase("standard-mix+onset", "trust", {"sent": 2500, "correct": 2490, "wrong": 4,
                  "failed": 6}, detections=_detections(_timeline("trust"), ONSETS),
                  data_plane="envoy")  # fmt: skip
    out.append(envoy.summary())
    return out


def test_a_phase_on_envoy_is_a_row_of_its_own() -> None:
    rows = _summaries()
    assert [r["policy"] for r in rows][-2:] == ["oracle", "trust (envoy)"]
    assert rows[-1]["data_plane"] == "envoy" and rows[0]["data_plane"] == "balancer"
    # Detection reads /trust the way the trust policy routes, on Envoy as on the proxy.
    assert (rows[-1]["detected"], rows[-1]["faults"]) == (rows[0]["detected"], rows[0]["faults"])


@pytest.mark.parametrize("width", [100, 80])
def test_the_demo_table_wraps_within_the_terminal_instead_of_cutting(width: int) -> None:
    console = Console(width=width, record=True)
    console.print(rich_table(_summaries(), "Policies on the standard mix with mid-run chaos"))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    # Every cell whole at 100 columns; at 80 the widest names fold onto a second line.
    cells = ("outlier-ejection", "least-connections", "round-robin", "2011.3", "2/4", "4/4")
    if width == 100:
        assert all(cell in text for cell in cells)
    flat = re.sub(r"\s+", "", text)
    assert all(cell in flat for cell in ("outlier-eje", "2011.3", "2/4"))
