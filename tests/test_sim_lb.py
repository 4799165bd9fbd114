"""`twlb sim lb`: the balancer's own policies, driven by the kernel on simulated servers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from twlb.balancer.policies import POLICIES
from twlb.sim.cli import command
from twlb.sim.lb import LbScenario, LbSimulation, ServerFault, compare

from twlb.spec import PolicyName

SCENARIO = LbScenario(duration=30.0, rate=200.0)


def test_the_simulated_balancer_runs_the_balancers_own_policy_objects():
    sim = LbSimulation("p2c-ewma", SCENARIO)
    assert type(sim.policy) is POLICIES[PolicyName.P2C_EWMA]


def test_same_seed_same_comparison():
    assert compare(["round-robin", "trust"], SCENARIO) == compare(
        ["round-robin", "trust"], SCENARIO
    )


def test_oracle_never_routes_to_an_unhealthy_server_and_trust_learns_to_avoid_them():
    by = {r["policy"]: r for r in compare(["round-robin", "trust", "oracle"], SCENARIO)}
    assert by["oracle"]["tries_to_unhealthy_ratio"] == 0.0
    # round-robin spreads evenly: 2 of 6 servers unhealthy for much of the run
    assert by["round-robin"]["tries_to_unhealthy_ratio"] > 0.2
    assert (
        by["trust"]["tries_to_unhealthy_ratio"] < by["round-robin"]["tries_to_unhealthy_ratio"] / 3
    )
    assert by["trust"]["latency_ms"]["p99"] < by["round-robin"]["latency_ms"]["p99"]


def test_a_crashed_server_refuses_connections_and_the_retry_saves_the_request():
    scenario = LbScenario(
        speeds=(1.0, 1.0), faults={0: ServerFault("crash", 0.0, 100.0)}, duration=10.0, rate=50.0
    )
    result = LbSimulation("round-robin", scenario).run()
    assert result["served_per_server"]["server_0"] == 0
    assert result["success_ratio"] == 1.0 and result["requests"] > 400


@pytest.mark.parametrize(
    "bad", [{"speeds": ()}, {"speeds": (1.0, 0.0)}, {"faults": {7: ServerFault("crash", 1, 2)}}]
)
def test_bad_scenarios_are_refused(bad):
    with pytest.raises(ValueError):
        LbScenario(**bad)


def test_cli_compares_policies_and_writes_json(tmp_path):
    out = tmp_path / "lb.json"
    result = CliRunner().invoke(
        command,
        [
            "lb",
            "--policy",
            "round-robin,p2c-ewma",
            "--duration",
            "5",
            "--fault",
            "1=delay@1-4",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == ["round-robin", "p2c-ewma"]
    assert data["scenario"]["faults"] == {"1": ["delay", 1.0, 4.0, 0.5]}
    assert CliRunner().invoke(command, ["lb", "--fault", "1=melt@1-4"]).exit_code == 2
