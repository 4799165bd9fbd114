"""The TrustCluster's scale subresource: declared in the CRD from the spec model, and
`kubectl scale` (a merge patch of /scale) driving the real operator against the emulator."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from kube_harness import (
    DEPLOYMENTS,
    FAST_OPERATOR,
    TRUSTCLUSTERS,
    emulated_cluster,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.operator.crd import SCALE_SUBRESOURCE, render_crd

from twlb.spec import TrustClusterSpec

NS = "lab"

pytestmark = pytest.mark.timeout(60)


def _schema_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_the_crd_declares_a_scale_subresource_over_spec_backends() -> None:
    crd = render_crd()
    kubernetes_validate.validate(crd, "1.31", strict=True)
    version = crd["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert scale == SCALE_SUBRESOURCE
    assert scale["specReplicasPath"] == ".spec.backends"
    root = version["schema"]["openAPIV3Schema"]
    # Every path names a field of the schema derived from the model, of the type the API
    # server requires there: integers for the replica counts, a string selector.
    spec_field = _schema_at(root, scale["specReplicasPath"])
    field = TrustClusterSpec.model_fields["backends"]
    assert spec_field["type"] == "integer" and spec_field["default"] == field.default
    assert _schema_at(root, scale["statusReplicasPath"])["type"] == "integer"
    assert _schema_at(root, scale["labelSelectorPath"])["type"] == "string"


async def _scale(cluster, name: str, replicas: int | str) -> Any:
    path = cluster.path(TRUSTCLUSTERS, NS, name) + "/scale"
    return await cluster.api.patch(
        path,
        json={"spec": {"replicas": replicas}},
        headers={"Content-Type": "application/merge-patch+json", "Connection": "close"},
    )


async def test_kubectl_scale_changes_spec_backends_and_the_operator_follows() -> None:
    async with emulated_cluster() as cluster, running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("web", NS, {"backends": 2}))

        def observed(gen: int) -> bool:
            tc = cluster.get(TRUSTCLUSTERS, NS, "web") or {}
            return (tc.get("status") or {}).get("observedGeneration") == gen

        await wait_for(lambda: observed(1), timeout=10)
        # `kubectl scale trustcluster web --replicas 4` is this merge patch of /scale.
        r = await _scale(cluster, "web", 4)
        assert r.status == 200, await r.text()
        scale = await r.json()
        assert (scale["kind"], scale["spec"]["replicas"]) == ("Scale", 4)
        tc = cluster.get(TRUSTCLUSTERS, NS, "web")
        assert tc["spec"]["backends"] == 4 and tc["metadata"]["generation"] == 2
        await wait_for(lambda: observed(2), timeout=10)
        nodes = {n for n in cluster.names(DEPLOYMENTS, NS) if n.startswith("web-node-")}
        assert nodes == {f"web-node-{i}" for i in range(4)}

        # The Deployment controller's part: three pods became ready; the scale reports them.
        for name in ("web-node-0", "web-node-1", "web-node-2"):
            await cluster.patch(DEPLOYMENTS, NS, name, {"status": {"readyReplicas": 1}})

        def ready_count() -> int:
            return ((cluster.get(TRUSTCLUSTERS, NS, "web") or {}).get("status") or {}).get(
                "readyBackends", 0
            )

        await wait_for(lambda: ready_count() == 3, timeout=10)
        read = await cluster.api.get(
            cluster.path(TRUSTCLUSTERS, NS, "web") + "/scale", headers={"Connection": "close"}
        )
        scale = await read.json()
        assert scale["spec"]["replicas"] == 4 and scale["status"]["replicas"] == 3
        assert scale["status"]["selector"] == (
            "twlb.dev/cluster=web,app.kubernetes.io/component=backend"
        )

        # Scaling down removes the extra nodes; an out-of-range count is refused.
        assert (await _scale(cluster, "web", 1)).status == 200
        await wait_for(lambda: observed(3), timeout=10)
        nodes = {n for n in cluster.names(DEPLOYMENTS, NS) if n.startswith("web-node-")}
        assert nodes == {"web-node-0"}
        refused = await _scale(cluster, "web", 0)
        assert refused.status == 422
        assert cluster.get(TRUSTCLUSTERS, NS, "web")["spec"]["backends"] == 1
