"""The operator wires gossip: a headless Service for peer discovery with the UDP port
declared, each backend pod under it with a stable DNS identity, its seeds and the spec's
gossip section as environment; gossip off removes the Service (the real kopf operator
against kmock's API emulator, as tests/test_operator.py)."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kube_harness import (
    DEPLOYMENTS,
    FAST_OPERATOR,
    SERVICES,
    TRUSTCLUSTERS,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.operator.render import GOSSIP_PORT, Owner, render_children

from twlb.spec import TrustClusterSpec

NS = "lab"

pytestmark = pytest.mark.timeout(60)


def _env(deployment: dict) -> dict[str, str | None]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_rendered_gossip_objects_are_valid_kubernetes() -> None:
    owner = Owner("g", NS, "7d2f0c4e-1111-2222-3333-444455556666")
    spec = TrustClusterSpec.model_validate(
        {"backends": 3, "gossip": {"protocol": "round-robin", "port": 7000}}
    )
    objs = render_children(owner, spec, admin_token="a", control_token="c")
    for obj in objs:
        kubernetes_validate.validate(obj, "1.31", strict=True)
    gossip = next(o for o in objs if o["metadata"]["name"] == "g-gossip")
    assert gossip["spec"]["clusterIP"] == "None"
    assert gossip["spec"]["ports"] == [
        {"name": "gossip", "port": 7000, "targetPort": "gossip", "protocol": "UDP"}
    ]
    node = next(
        o for o in objs if o["metadata"]["name"] == "g-node-2" and o["kind"] == "Deployment"
    )
    env = _env(node)
    assert env["TWLB_BACKEND_GOSSIP_PROTOCOL"] == "round-robin"
    assert env["TWLB_BACKEND_GOSSIP_ADVERTISE"] == "g-node-2.g-gossip.lab.svc.cluster.local:7000"


async def test_operator_renders_the_headless_gossip_service_and_removes_it_when_off(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("gsp", NS, {"backends": 3}))
        await wait_for(lambda: cluster.get(SERVICES, NS, "gsp-gossip") is not None, timeout=10)
        service = cluster.get(SERVICES, NS, "gsp-gossip")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "backend"
        assert service["spec"]["ports"][0]["protocol"] == "UDP"
        await wait_for(lambda: cluster.get(DEPLOYMENTS, NS, "gsp-node-1") is not None, timeout=10)
        node = cluster.get(DEPLOYMENTS, NS, "gsp-node-1")
        pod = node["spec"]["template"]["spec"]
        assert (pod["hostname"], pod["subdomain"]) == ("gsp-node-1", "gsp-gossip")
        udp = [p for p in pod["containers"][0]["ports"] if p["protocol"] == "UDP"]
        assert udp == [{"name": "gossip", "containerPort": GOSSIP_PORT, "protocol": "UDP"}]
        env = _env(node)
        assert env["TWLB_BACKEND_GOSSIP"] == "1"
        assert env["TWLB_BACKEND_GOSSIP_SEEDS"].split() == [
            f"gsp-node-{i}.gsp-gossip.{NS}.svc.cluster.local:{GOSSIP_PORT}" for i in range(3)
        ]

        await cluster.patch(TRUSTCLUSTERS, NS, "gsp", {"spec": {"gossip": {"enabled": False}}})
        await wait_for(lambda: cluster.get(SERVICES, NS, "gsp-gossip") is None, timeout=10)
        await wait_for(
            lambda: (
                _env(cluster.get(DEPLOYMENTS, NS, "gsp-node-1")).get("TWLB_BACKEND_GOSSIP") == "0"
            ),
            timeout=10,
        )
