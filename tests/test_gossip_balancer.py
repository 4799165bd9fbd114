"""The balancer uses the members' gossip verdict: a backend every live member agrees is
dead leaves the rotation at once, before its health checks would have taken it out, and
comes back when the members readmit it; /trust shows the verdict (real processes from the
embedded runtime, gossip on loopback UDP)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from conftest import wait_until
from twlb.balancer.health import HealthEvent, HealthState, HealthTracker
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.processes.managed import free_port_range

from twlb.spec import TrustCluster

#: Health checks every 3 s, three failures to fall: no check can take a killed backend
#: out within 6 s. Gossip rounds of 0.1 s agree within about a second.
HEALTH = ("--healthy-threshold", "1", "--unhealthy-threshold", "3")


def test_agreed_dead_keeps_a_backend_out_whatever_its_checks_say() -> None:
    tracker = HealthTracker(healthy_threshold=1, unhealthy_threshold=3)
    tracker.set_backends(["a"], 0.0)
    tracker.on_check("a", True, 0.0)
    assert tracker.on_gossip("a", True, 1.0) is HealthState.UNHEALTHY  # at once
    assert tracker.on_check("a", True, 2.0) is HealthState.UNHEALTHY  # checks cannot undo it
    assert tracker.on_gossip("a", False, 3.0) is HealthState.UNKNOWN  # readmitted: judged again
    assert tracker.is_up("a")
    assert tracker.apply("a", HealthEvent.GOSSIP_DEAD, 4.0) is HealthState.UNHEALTHY


def _trust_row(http: httpx.Client, balancer: str, url: str) -> dict:
    rows = http.get(balancer + "/trust").json()["backends"]
    return next(r for r in rows if r["url"] == url)


def test_balancer_drops_an_agreed_dead_backend_before_its_checks_and_takes_it_back(
    tmp_path: Path,
) -> None:
    spec = TrustCluster.model_validate(
        {
            "apiVersion": "twlb.dev/v1alpha1",
            "kind": "TrustCluster",
            "metadata": {"name": "gb"},
            "spec": {
                "backends": 4,
                "policy": "round-robin",
                "balancer": {"healthIntervalS": 3.0, "gossipPollS": 0.1},
                "gossip": {"protocol": "swim", "intervalS": 0.1},
            },
        }
    )
    cluster = EmbeddedCluster(
        spec,
        port_base=free_port_range(8),
        state_dir=tmp_path / "state",
        prometheus=False,
        balancer_args=HEALTH,
    )
    with cluster, httpx.Client(timeout=2.0) as http:
        victim = cluster.nodes[2]
        # Alive in gossip, and checked healthy once: the balancer spreads each backend's
        # first check over the 3 s interval, and a backend with no passing check yet falls
        # on its first failed one, which would take the victim out before gossip could.
        wait_until(
            lambda: all(
                (r := _trust_row(http, cluster.admin_url, n.url))["gossip"]["verdict"] == "alive"
                and r["health"]["state"] == "healthy"
                for n in cluster.nodes
            ),
            20,
            "every backend alive in gossip and checked healthy",
            poll=0.05,
        )
        killed_at = time.monotonic()
        cluster.kill_node(victim.name, hold_down_s=3600)
        row = wait_until(
            lambda: (r := _trust_row(http, cluster.admin_url, victim.url))["up"] is False and r,
            20,
            "the killed backend out of rotation",
            poll=0.05,
        )
        out_after = time.monotonic() - killed_at
        assert row["gossip"]["verdict"] == "dead" and row["gossip"]["down_in"] == 3
        assert row["health"]["gossip_dead"] is True
        # taken out by the members' verdict, not by its checks (they need three failures)
        assert row["health"]["consecutive_failures"] < 3
        assert out_after < 6.0  # no check could have taken it out by then (3 x 3 s)
        # the balancer no longer sends to it: every answer comes from another node
        nodes = {
            http.get(cluster.balancer_url + "/work", params={"key": f"k{i}"}).json()["node"]
            for i in range(12)
        }
        assert victim.name not in nodes

        victim.restart.next_start = time.monotonic()
        cluster.supervise_once()
        row = wait_until(
            # back in rotation once the members hold it alive again (a verdict on its way
            # may still say suspect for a moment after its first passing check)
            lambda: (
                (r := _trust_row(http, cluster.admin_url, victim.url))["up"] is True
                and r["gossip"]["verdict"] == "alive"
                and r
            ),
            20,
            "the restarted backend back in rotation",
            poll=0.05,
        )
        assert row["gossip"]["verdict"] == "alive"
