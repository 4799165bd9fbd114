"""Gossip on real processes: backends started by the embedded runtime gossip over UDP on
loopback. For every protocol: one node killed, then two at once, then one restarted; each
time every live member reaches the same verdict, and the result is written as JSON (node,
verdict, first detection, agreement time).

Timings are short (a 0.1-0.2 s round) so that each verdict takes a second or two; the
deadlines below are ten times what the cores' own bounds give, because the machine is
shared: they catch a verdict that never comes, not a slow one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from twlb.gossip.consensus import FailureWatch, agreed_alive, agreed_down
from twlb.gossip.membership import MemberState
from twlb.gossip.nodes import PROTOCOLS
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.processes.managed import free_port_range

from twlb.spec import TrustCluster

FAST = {
    "swim": {"intervalS": 0.2, "probeTimeoutS": 0.1, "disseminationIntervalS": 0.05},
    "random": {"intervalS": 0.1},
    "round-robin": {"intervalS": 0.1},
    "binary-round-robin": {"intervalS": 0.1},
    "sequence-check": {"intervalS": 0.1},
    "consensus": {"intervalS": 0.1},
}
DEADLINE_S = 30.0


def _cluster(protocol: str, backends: int) -> TrustCluster:
    return TrustCluster.model_validate(
        {
            "apiVersion": "twlb.dev/v1alpha1",
            "kind": "TrustCluster",
            "metadata": {"name": "gossip"},
            "spec": {
                "backends": backends,
                "policy": "round-robin",
                "gossip": {"protocol": protocol, **FAST[protocol]},
            },
        }
    )


class Observer:
    """Polls every live node's GET /gossip into a FailureWatch."""

    def __init__(self, cluster: EmbeddedCluster) -> None:
        self.cluster = cluster
        self.ids = {n.name: f"127.0.0.1:{n.port}" for n in cluster.nodes}
        self.watch = FailureWatch(self.ids.values())
        self.http = httpx.Client(timeout=1.0)
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def poll(self) -> None:
        for node in self.cluster.nodes:
            me = self.ids[node.name]
            if me in self.watch.down:
                continue
            try:
                view = self.http.get(node.url + "/gossip").json()
            except httpx.HTTPError:
                continue  # restarting: not serving yet
            assert view["self"] == me
            held = self.watch.views[me]
            for member in view["members"]:
                state = MemberState(member["state"])
                if held.get(member["node"]) is not state:  # a change of verdict, not a repeat
                    self.watch.observe(me, member["node"], state, self.now())

    def wait(self, done, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            self.poll()
            if done():
                return
            time.sleep(0.05)
        pytest.fail(f"{what} not reached in {DEADLINE_S} s; views: {self.watch.live_views()}")

    def kill(self, *names: str) -> None:
        for name in names:
            self.cluster.kill_node(name, hold_down_s=3600)
            self.watch.crash(self.ids[name], self.now())

    def restart(self, name: str) -> None:
        node = self.cluster.node(name)
        node.restart.next_start = time.monotonic()
        self.cluster.supervise_once()
        assert node.alive
        self.watch.restart(self.ids[name], self.now())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_members_agree_on_one_kill_two_kills_and_a_restart(protocol: str, tmp_path: Path) -> None:
    spec = _cluster(protocol, 5)
    cluster = EmbeddedCluster(
        spec, port_base=free_port_range(8), state_dir=tmp_path / "state", prometheus=False
    )
    with cluster:  # starts it; stops every process by pid on the way out
        obs = Observer(cluster)
        everyone = list(obs.ids.values())
        obs.wait(
            lambda: (
                all(agreed_alive(obs.watch.live_views(), n) for n in everyone)
                and all(len(v) == 4 for v in obs.watch.live_views().values())
            ),
            "everyone alive",
        )
        names = [n.name for n in cluster.nodes]
        obs.kill(names[1])
        obs.wait(lambda: agreed_down(obs.watch.live_views(), obs.ids[names[1]]), "one kill agreed")
        obs.kill(names[2], names[3])
        obs.wait(
            lambda: all(agreed_down(obs.watch.live_views(), obs.ids[n]) for n in names[2:4]),
            "two kills agreed",
        )
        obs.restart(names[1])
        obs.wait(lambda: agreed_alive(obs.watch.live_views(), obs.ids[names[1]]), "readmission")

    report = obs.watch.report()
    out = tmp_path / f"gossip-live-{protocol}.json"
    out.write_text(json.dumps({"protocol": protocol, "nodes": 5, "failures": report}, indent=1))
    written = json.loads(out.read_text())["failures"]
    assert [f["node"] for f in written] == [obs.ids[n] for n in names[1:4]]
    for failure in written:
        assert failure["verdict"] == "dead"
        assert 0 < failure["first_detection_s"] <= failure["agreement_s"] < DEADLINE_S
    assert written[0]["readmitted_s"] is not None
    assert not obs.watch.false_positives
    # the same verdict everywhere: the two survivors and the restarted node
    views = obs.watch.live_views()
    assert set(views) == {obs.ids[n] for n in (names[0], names[4], names[1])}
