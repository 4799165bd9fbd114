"""The Kubernetes chaos actions and probes against the real operator on kmock's emulator:
a fault patched into a TrustCluster is reconciled and rolled back exactly, and the
one-Deployment-per-node probe sees duplicates."""

from __future__ import annotations

import asyncio
import json

import pytest
from chaoslib.exceptions import ActivityFailed
from kube_harness import (
    DEPLOYMENTS,
    FAST_OPERATOR,
    TRUSTCLUSTERS,
    EmulatedCluster,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.chaos_k8s import activities
from twlb.operator.render import ANNOTATION_FAULT_TYPE

NS = "chaos"
NAME = "lab"
SPEC = {"backends": 3, "seed": 5, "nodes": [{"index": 2, "fault": {"type": "error"}}]}

pytestmark = pytest.mark.timeout(90)


def _fault_of(cluster: EmulatedCluster, node: str) -> str | None:
    d = cluster.get(DEPLOYMENTS, NS, node) or {}
    return (d.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_FAULT_TYPE)


async def test_a_patched_fault_is_reconciled_and_rolled_back_exactly(cluster: EmulatedCluster):
    await cluster.create(TRUSTCLUSTERS, trustcluster(NAME, NS, SPEC))
    async with running_operator([NS], FAST_OPERATOR):
        await wait_for(lambda: len(cluster.names(DEPLOYMENTS, NS)) >= 4, timeout=30)
        assert await asyncio.to_thread(activities.one_deployment_per_node, NAME, NS) is True
        assert await asyncio.to_thread(activities.deployments_match_spec, NAME, NS) is True

        out = await asyncio.to_thread(
            activities.patch_node_fault, NAME, 2, {"type": "byzantine", "probability": 1.0}, NS
        )
        assert (out["node"], out["chaos_class"]) == (f"{NAME}-node-2", "byzantine")
        await wait_for(lambda: _fault_of(cluster, f"{NAME}-node-2") == "byzantine", timeout=30)
        assert await asyncio.to_thread(activities.deployments_match_spec, NAME, NS) is True
        # A second patch keeps the original for the rollback.
        await asyncio.to_thread(activities.patch_node_fault, NAME, 2, {"type": "delay"}, NS)

        back = await asyncio.to_thread(activities.restore_node_fault, NAME, 2, NS)
        assert back == {"node": f"{NAME}-node-2", "restored": True, "at": back["at"]}
        tc = cluster.get(TRUSTCLUSTERS, NS, NAME) or {}
        assert tc["spec"]["nodes"] == [{"index": 2, "fault": {"type": "error"}}]
        saved = activities.SAVED_ANNOTATION.format(index=2)
        assert saved not in (tc["metadata"].get("annotations") or {})
        await wait_for(lambda: _fault_of(cluster, f"{NAME}-node-2") == "error", timeout=30)
        with pytest.raises(ActivityFailed, match="no saved fault"):
            await asyncio.to_thread(activities.restore_node_fault, NAME, 2, NS)


async def test_a_duplicate_or_stale_deployment_is_named(cluster: EmulatedCluster):
    await cluster.create(TRUSTCLUSTERS, trustcluster(NAME, NS, SPEC))
    async with running_operator([NS], FAST_OPERATOR):
        await wait_for(lambda: len(cluster.names(DEPLOYMENTS, NS)) >= 4, timeout=30)
    twin = json.loads(json.dumps(cluster.get(DEPLOYMENTS, NS, f"{NAME}-node-0")))
    twin["metadata"] = {
        "name": f"{NAME}-node-0-twin",
        "namespace": NS,
        "labels": twin["metadata"]["labels"],
        "annotations": {ANNOTATION_FAULT_TYPE: "benign"},
    }
    await cluster.create(DEPLOYMENTS, twin)
    with pytest.raises(ActivityFailed, match=f"{NAME}-node-0': 2"):
        await asyncio.to_thread(activities.one_deployment_per_node, NAME, NS)
    # With the operator stopped, a spec change stays unreconciled and the probe says so.
    await cluster.patch(TRUSTCLUSTERS, NS, NAME, {"spec": {"nodes": []}})
    with pytest.raises(ActivityFailed, match="not reconciled"):
        await asyncio.to_thread(activities.deployments_match_spec, NAME, NS)
