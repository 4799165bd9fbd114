"""The real kopf operator against kmock's API emulator: children, updates, status, errors."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from kube_harness import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    FAST_OPERATOR,
    SECRETS,
    SERVICES,
    TRUSTCLUSTERS,
    EmulatedCluster,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.operator.render import (
    ANNOTATION_BALANCER_URL,
    ANNOTATION_FAULT_TYPE,
    LABEL_CLUSTER,
)

from twlb.spec import FaultType, TrustClusterSpec, assign_faults

NS = "lab"
STANDARD_MIX = {
    "backends": 6,
    "seed": 7,
    "faultMix": [
        {"type": "delay", "count": 1, "delayMs": 3000},
        {"type": "error", "count": 1},
        {"type": "byzantine", "count": 1},
    ],
}

pytestmark = pytest.mark.timeout(60)


def _status(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    return (cluster.get(TRUSTCLUSTERS, NS, name) or {}).get("status") or {}


def _observed(cluster: EmulatedCluster, name: str, generation: int) -> bool:
    return _status(cluster, name).get("observedGeneration") == generation


def _events(cluster: EmulatedCluster, name: str, reason: str) -> list[dict[str, Any]]:
    out = []
    for ev_name in cluster.names(EVENTS, NS):
        ev = cluster.get(EVENTS, NS, ev_name) or {}
        if ev.get("involvedObject", {}).get("name") == name and ev.get("reason") == reason:
            out.append(ev)
    return out


def _children(cluster: EmulatedCluster, name: str) -> dict[str, set[str]]:
    out = {}
    for res in (DEPLOYMENTS, SERVICES, CONFIGMAPS, SECRETS):
        out[res] = {
            n
            for n in cluster.names(res, NS)
            if (cluster.get(res, NS, n) or {})
            .get("metadata", {})
            .get("labels", {})
            .get(LABEL_CLUSTER)
            == name
        }
    return out


async def test_create_renders_every_node_with_its_fault_and_owner_reference(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("mix", NS, STANDARD_MIX))
        await wait_for(lambda: _observed(cluster, "mix", 1), timeout=10)
        tc = cluster.get(TRUSTCLUSTERS, NS, "mix")
        uid = tc["metadata"]["uid"]
        nodes = assign_faults(TrustClusterSpec.model_validate(STANDARD_MIX), "mix")
        children = _children(cluster, "mix")
        node_names = {n.name for n in nodes}
        assert children[DEPLOYMENTS] == node_names | {"mix-balancer"}
        assert children[SERVICES] == node_names | {
            "mix-balancer", "mix-gossip", "mix-balancer-peers"
        }  # fmt: skip
        assert children[CONFIGMAPS] == {"mix-model", "mix-truth"}
        assert children[SECRETS] == {"mix-tokens"}
        for res, names in children.items():
            for n in names:
                refs = cluster.get(res, NS, n)["metadata"]["ownerReferences"]
                assert [(r["kind"], r["name"], r["uid"]) for r in refs] == [
                    ("TrustCluster", "mix", uid)
                ]
        for node in nodes:
            dep = cluster.get(DEPLOYMENTS, NS, node.name)
            assert dep["metadata"]["annotations"][ANNOTATION_FAULT_TYPE] == node.fault.type
            env = {
                e["name"]: e.get("value")
                for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            for k, v in node.fault.to_env().items():
                assert env[k] == v
        balancer = cluster.get(DEPLOYMENTS, NS, "mix-balancer")
        pod = balancer["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        # The balancer follows the node Services itself: no backend list in its template.
        assert "--backend" not in args
        flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--discover")}
        assert flag == {
            "--discover-services": "twlb.dev/cluster=mix,app.kubernetes.io/component=backend",
            "--discover-namespace": NS,
            "--discover-port": "http",
        }
        assert pod["serviceAccountName"] == "mix-balancer"
        for resource in ("v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                         "rbac.authorization.k8s.io/v1/rolebindings"):  # fmt: skip
            assert cluster.names(resource, NS) == {"mix-balancer"}
            refs = cluster.get(resource, NS, "mix-balancer")["metadata"]["ownerReferences"]
            assert [r["uid"] for r in refs] == [uid]
        assert cluster.get(SERVICES, NS, "mix-balancer")["spec"]["type"] == "NodePort"

        status = _status(cluster, "mix")
        assert status["faulty"] == 3
        assert status["readyBackends"] == 0
        assert status["phase"] == "Pending"
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Ready": "False",
            "Degraded": "False",
        }
        await wait_for(lambda: _events(cluster, "mix", "Reconciled"), timeout=5)


async def test_fault_change_touches_only_that_node_and_rerun_changes_nothing(cluster):
    spec = {"backends": 4, "seed": 3}
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("edit", NS, spec))
        await wait_for(lambda: _observed(cluster, "edit", 1), timeout=10)
        deployments = sorted(_children(cluster, "edit")[DEPLOYMENTS])
        before = {n: cluster.writes(DEPLOYMENTS, NS, n) for n in deployments}

        await cluster.patch(
            TRUSTCLUSTERS,
            NS,
            "edit",
            {"spec": {"nodes": [{"index": 2, "fault": {"type": "error", "probability": 0.5}}]}},
        )
        await wait_for(lambda: _observed(cluster, "edit", 2), timeout=10)
        after = {n: cluster.writes(DEPLOYMENTS, NS, n) for n in deployments}
        changed = {n for n in deployments if after[n] != before[n]}
        assert changed == {"edit-node-2"}
        dep = cluster.get(DEPLOYMENTS, NS, "edit-node-2")
        assert dep["metadata"]["annotations"][ANNOTATION_FAULT_TYPE] == FaultType.ERROR
        assert dep["metadata"]["annotations"]["twlb.dev/fault-probability"] == "0.5"
        assert _status(cluster, "edit")["faulty"] == 1

    # A restarted operator resumes the cluster and finds nothing to change.
    everything = {
        (res, n): cluster.writes(res, NS, n)
        for res, names in _children(cluster, "edit").items()
        for n in names
    }
    async with running_operator([NS], FAST_OPERATOR):
        await wait_for(lambda: _status(cluster, "edit").get("trustReadAt") is not None, 10)
    assert {k: cluster.writes(k[0], NS, k[1]) for k in everything} == everything


async def test_scaling_down_deletes_the_extra_nodes(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("shrink", NS, {"backends": 5}))
        await wait_for(lambda: _observed(cluster, "shrink", 1), timeout=10)
        balancer_writes = cluster.writes(DEPLOYMENTS, NS, "shrink-balancer")
        await cluster.patch(TRUSTCLUSTERS, NS, "shrink", {"spec": {"backends": 2}})
        await wait_for(lambda: _observed(cluster, "shrink", 2), timeout=10)
        children = _children(cluster, "shrink")
        assert children[DEPLOYMENTS] == {"shrink-node-0", "shrink-node-1", "shrink-balancer"}
        assert children[SERVICES] == {
            "shrink-node-0",
            "shrink-node-1",
            "shrink-balancer",
            "shrink-gossip",
            "shrink-balancer-peers",
        }
        # The balancer was not touched: it follows the node Services by itself.
        assert cluster.writes(DEPLOYMENTS, NS, "shrink-balancer") == balancer_writes
        assert len(_status(cluster, "shrink")["nodes"]) == 2


async def test_deleting_the_cluster_deletes_its_children(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("gone", NS, {"backends": 2}))
        await wait_for(lambda: _observed(cluster, "gone", 1), timeout=10)
        assert cluster.get(TRUSTCLUSTERS, NS, "gone")["metadata"]["finalizers"]
        await cluster.delete(TRUSTCLUSTERS, NS, "gone")
        await wait_for(lambda: cluster.get(TRUSTCLUSTERS, NS, "gone") is None, timeout=10)
        assert all(not names for names in _children(cluster, "gone").values())


async def test_invalid_spec_is_reported_and_the_operator_keeps_working(cluster):
    bad = {"backends": 2, "faultMix": [{"type": "error", "count": 3}]}
    async with running_operator([NS], FAST_OPERATOR) as task:
        await cluster.create(TRUSTCLUSTERS, trustcluster("bad", NS, bad))
        await wait_for(lambda: _status(cluster, "bad").get("phase") == "Invalid", timeout=10)
        status = _status(cluster, "bad")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
        assert "faultMix assigns 3 faults to only 2 backends" in status["message"]
        await wait_for(lambda: _events(cluster, "bad", "InvalidSpec"), timeout=5)
        assert all(not names for names in _children(cluster, "bad").values())

        await cluster.create(TRUSTCLUSTERS, trustcluster("good", NS, {"backends": 1}))
        await wait_for(lambda: _observed(cluster, "good", 1), timeout=10)
        assert not task.done()

        # Fixing the spec brings the cluster up.
        await cluster.patch(TRUSTCLUSTERS, NS, "bad", {"spec": {"backends": 3}})
        await wait_for(lambda: _status(cluster, "bad").get("phase") == "Pending", timeout=10)
        assert len(_children(cluster, "bad")[DEPLOYMENTS]) == 4


async def test_status_counts_ready_nodes_and_reads_trust_from_a_real_balancer(cluster, spawn):
    # Started together: on two cores the imports, not the waiting, dominate.
    p_healthy, healthy = spawn("backend", "--node-id", "n0", "--seed", "1", wait=False)
    p_faulty, faulty = spawn(
        "backend", "--node-id", "n1", "--seed", "2", "--fault-type", "error", wait=False
    )
    p_balancer, balancer = spawn(
        "balancer",
        "--backend",
        healthy,
        "--backend",
        faulty,
        "--policy",
        "trust",
        "--window",
        "0.5",
        "--health-interval",
        "0.2",
        "--health-timeout",
        "0.1",
        wait=False,
    )
    for proc, url in ((p_healthy, healthy), (p_faulty, faulty), (p_balancer, balancer)):
        proc.wait_ready(url + "/healthz", timeout=60)
    # Traffic gives the balancer's trust engine something to judge.
    with httpx.Client(base_url=balancer, timeout=2.0) as client:
        for i in range(30):
            client.get("/work", params={"key": f"k{i}"})

    meta = {"annotations": {ANNOTATION_BALANCER_URL: balancer}}
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("live", NS, {"backends": 2}, **meta))
        await wait_for(lambda: _observed(cluster, "live", 1), timeout=10)
        # The Deployment controller's part: pods became ready.
        for name in ("live-node-0", "live-node-1", "live-balancer"):
            await cluster.patch(DEPLOYMENTS, NS, name, {"status": {"readyReplicas": 1}})

        def settled() -> bool:
            s = _status(cluster, "live")
            return (
                s.get("readyBackends") == 2
                and s.get("balancerReady") is True
                and len(s.get("trust") or []) == 2
            )

        await wait_for(settled, timeout=10)
        status = _status(cluster, "live")

    truth = httpx.get(balancer + "/trust").json()["backends"]
    assert status.get("trustError") is None
    assert status["balancerUrl"] == balancer
    assert {r["url"] for r in status["trust"]} == {b["url"] for b in truth}
    assert all(0.0 <= r["weight"] <= 1.0 for r in status["trust"])
    assert status["suspected"] == sum(1 for r in status["trust"] if r["weight"] < 0.5)
    assert status["balancerReady"] is True
    assert status["phase"] == ("Degraded" if status["suspected"] else "Running")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


async def test_timer_repairs_drift_and_loads_a_published_model(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("heal", NS, {"backends": 2}))
        await wait_for(lambda: _observed(cluster, "heal", 1), timeout=10)

        def balancer_args() -> list[str]:
            dep = cluster.get(DEPLOYMENTS, NS, "heal-balancer")
            return dep["spec"]["template"]["spec"]["containers"][0]["args"]

        assert "--model" not in balancer_args()
        # Someone deletes a node's Service; a trained model is published (twlb.ml publish).
        await cluster.delete(SERVICES, NS, "heal-node-1")
        await cluster.patch(CONFIGMAPS, NS, "heal-model", {"binaryData": {"model.onnx": "AAEC"}})
        await wait_for(lambda: cluster.get(SERVICES, NS, "heal-node-1") is not None, timeout=10)
        await wait_for(lambda: "--model" in balancer_args(), timeout=10)
        args = balancer_args()
        assert args[args.index("--model") + 1] == "/etc/twlb/model/model.onnx"
        # The model's content is the publisher's: the operator never rewrites it.
        assert cluster.get(CONFIGMAPS, NS, "heal-model")["binaryData"] == {"model.onnx": "AAEC"}


PDBS = "policy/v1/poddisruptionbudgets"


async def test_balancer_replicas_roll_one_at_a_time_ready_on_the_admin_port(cluster):
    spec = {"backends": 3, "seed": 1, "balancer": {"replicas": 3, "drainS": 7}}
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("ha", NS, spec))
        await wait_for(lambda: _observed(cluster, "ha", 1), timeout=10)
        dep = cluster.get(DEPLOYMENTS, NS, "ha-balancer")
        assert dep["spec"]["replicas"] == 3
        # A rollout never goes below the replicas asked for: a new pod is ready first.
        assert dep["spec"]["strategy"] == {
            "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}
        }  # fmt: skip
        pod = dep["spec"]["template"]["spec"]
        balancer = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in balancer["ports"]}
        assert ports == {"http": 8080, "admin": 8081}
        assert balancer["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert balancer["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert balancer["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        assert pod["terminationGracePeriodSeconds"] == 5 + 7 + 5  # preStop, drain, margin
        template = dep["spec"]["template"]["metadata"]["annotations"]
        assert template["prometheus.io/port"] == "8081"  # Prometheus scrapes the admin port
        # The admin token: a file from the tokens Secret, never an argument or a value.
        args = balancer["args"]
        flag = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        assert flag["--admin-token-file"] == "/etc/twlb/tokens/admin-token"
        assert flag["--admin-port"] == "8081" and flag["--admin-host"] == "0.0.0.0"
        assert flag["--peer-dns"] == f"ha-balancer-peers.{NS}.svc.cluster.local:8081"
        assert flag["--drain-s"] == "7.0"
        secret = cluster.get(SECRETS, NS, "ha-tokens")
        token = (secret.get("stringData") or {}).get("admin-token") or secret["data"]["admin-token"]
        assert token not in args and all(token not in str(e) for e in balancer["env"])
        volume = next(v for v in pod["volumes"] if v["name"] == "tokens")
        assert volume["secret"]["secretName"] == "ha-tokens"
        assert {"name": "tokens", "mountPath": "/etc/twlb/tokens", "readOnly": True} in (
            balancer["volumeMounts"]
        )
        replica = next(e for e in balancer["env"] if e["name"] == "TWLB_BALANCER_REPLICA_ID")
        assert replica["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # The replicas find each other's admin listeners, ready or not.
        peers = cluster.get(SERVICES, NS, "ha-balancer-peers")["spec"]
        assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
        assert peers["ports"] == [{"name": "admin", "port": 8081, "targetPort": "admin"}]
        # At most one balancer pod evicted at a time.
        pdb = cluster.get(PDBS, NS, "ha-balancer")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]

        # A spec change is a new pod template, which Kubernetes rolls out one pod at a time.
        before = dep["spec"]["template"]
        await cluster.patch(
            TRUSTCLUSTERS, NS, "ha",
            {"spec": {"balancer": {"replicas": 3, "drainS": 7, "auditFraction": 0.1}}},
        )  # fmt: skip
        await wait_for(lambda: _observed(cluster, "ha", 2), timeout=10)
        after = cluster.get(DEPLOYMENTS, NS, "ha-balancer")
        assert after["spec"]["template"] != before
        assert "0.1" in after["spec"]["template"]["spec"]["containers"][0]["args"]
        assert after["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
