"""The TrustCluster's scale subresource: declared in the CRD from the spec model, and
`kubectl scale` (a merge patch of /scale) driving the real operator against the emulator,
with a real balancer following the node Services the operator creates and deletes."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import httpx
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
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

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
            return _observed(cluster, "web", gen)

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


async def test_kubectl_scale_leaves_the_balancer_alone_and_its_backends_follow(tmp_path) -> None:
    """The balancer Deployment's pod template names no backend: scaling the TrustCluster
    never changes it (no rollout, no restart, no evidence lost). A real balancer running
    that template's very command line against the emulator follows the node Services."""
    async with emulated_cluster() as cluster, running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("web", NS, {"backends": 2}))
        await wait_for(lambda: _observed(cluster, "web", 1), timeout=10)
        template = copy.deepcopy(cluster.get(DEPLOYMENTS, NS, "web-balancer")["spec"]["template"])
        writes = cluster.writes(DEPLOYMENTS, NS, "web-balancer")
        container = template["spec"]["containers"][0]
        assert "--backend" not in container["args"]
        token = "t" * 24
        token_file = tmp_path / "admin-token"
        token_file.write_text(token)
        port, admin_port = free_port(), free_port()
        # The template's own command line, its listeners and token file moved to the test's
        # (a later occurrence of an option wins).
        balancer = ManagedProcess(
            twlb_argv(*container["args"], "--host", "127.0.0.1", "--port", str(port),
                      "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
                      "--admin-token-file", str(token_file), "--model", "heuristic",
                      "--health-interval", "0.2", "--log-level", "warning"),
            env={"KUBECONFIG": str(cluster.kubeconfig)},
            log_path=tmp_path / "balancer.log",
        ).start()  # fmt: skip
        url = f"http://127.0.0.1:{admin_port}"  # /admin/backends and /trust
        nodes = [f"http://web-node-{i}.{NS}.svc:8080" for i in range(4)]
        try:
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5
            ) as client:

                async def backends() -> list[str] | None:
                    try:
                        r = await client.get("/admin/backends")
                    except httpx.HTTPError:
                        return None
                    return sorted(r.json()["backends"]) if r.status_code == 200 else None

                async def follows(expected: list[str], timeout: float = 15) -> None:
                    deadline = asyncio.get_running_loop().time() + timeout
                    while (seen := await backends()) != expected:
                        assert balancer.alive(), (tmp_path / "balancer.log").read_text()[-2000:]
                        assert asyncio.get_running_loop().time() < deadline, seen
                        await asyncio.sleep(0.1)

                async def health(backend: str) -> dict:
                    rows = (await client.get("/trust")).json()["backends"]
                    return next(r["health"] for r in rows if r["url"] == backend)

                # Started (a loaded machine takes its time), then it has the two nodes.
                await follows(nodes[:2], timeout=90)
                # web-node-0 has no pod here: its checks fail, and that evidence is kept.
                deadline = asyncio.get_running_loop().time() + 15
                while (before := await health(nodes[0]))["state"] != "unhealthy":
                    assert asyncio.get_running_loop().time() < deadline, before
                    await asyncio.sleep(0.1)

                assert (await _scale(cluster, "web", 4)).status == 200
                await wait_for(lambda: _observed(cluster, "web", 2), timeout=10)
                await follows(nodes)
                assert (await _scale(cluster, "web", 1)).status == 200
                await wait_for(lambda: _observed(cluster, "web", 3), timeout=10)
                await follows(nodes[:1])
                after = await health(nodes[0])
                assert (after["since"], after["state"]) == (before["since"], "unhealthy")
                assert after["transitions"] >= before["transitions"]
            dep = cluster.get(DEPLOYMENTS, NS, "web-balancer")
            assert dep["spec"]["template"] == template
            assert cluster.writes(DEPLOYMENTS, NS, "web-balancer") == writes
            assert balancer.alive()  # the same process throughout
        finally:
            balancer.stop()


def _observed(cluster, name: str, gen: int) -> bool:
    tc = cluster.get(TRUSTCLUSTERS, NS, name) or {}
    return (tc.get("status") or {}).get("observedGeneration") == gen


def test_discovery_reads_each_service_as_one_backend_and_leaves_other_backends_alone() -> None:
    from types import SimpleNamespace as NS_

    from twlb.balancer.discovery import DiscoveryError, follow, parse_selector, service_url

    def svc(name: str, *ports: tuple[str | None, int]) -> NS_:
        return NS_(
            metadata=NS_(name=name),
            spec=NS_(ports=[NS_(name=n, port=p) for n, p in ports]),
        )

    assert service_url(svc("a", ("http", 8080), ("gossip", 7946)), "lab", "http") == (
        "http://a.lab.svc:8080"
    )
    assert service_url(svc("a", ("x", 81)), "lab", "81") == "http://a.lab.svc:81"
    assert service_url(svc("a", (None, 90)), "lab", "http") == "http://a.lab.svc:90"
    assert service_url(svc("a", ("gossip", 7946)), "lab", "http") is None
    assert parse_selector("a=b, c==d") == {"a": "b", "c": "d"}
    for bad in ("a", "a!=b", "=b", "a in (b)"):
        with pytest.raises(DiscoveryError):
            parse_selector(bad)

    class Fleet:
        backends = ["http://static:1"]

        def add_backend(self, url: str) -> bool:
            self.backends.append(url)
            return True

        def remove_backend(self, url: str) -> bool:
            self.backends.remove(url)
            return True

    class Loop:
        def call_soon_threadsafe(self, fn, *args) -> None:
            fn(*args)

    fleet = Fleet()
    publish = follow(fleet, Loop(), set())
    publish(frozenset({"http://b:1", "http://a:1"}))
    assert fleet.backends == ["http://static:1", "http://a:1", "http://b:1"]  # sorted
    publish(frozenset({"http://b:1", "http://c:1"}))
    assert fleet.backends == ["http://static:1", "http://b:1", "http://c:1"]
    publish(frozenset())
    assert fleet.backends == ["http://static:1"]
