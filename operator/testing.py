"""Run the real operator against kmock's Kubernetes API emulator (tests and the benchmark).

kmock 0.8 keeps objects exactly as clients send them. `ApiServerEmulator` adds only what
a real API server would fill in on its own: uid, namespace, a name from generateName,
resourceVersion, generation (bumped when the spec changes) and creationTimestamp.
Everything the operator sends and reads still goes over HTTP to the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import kopf
import yaml
from kmock._internal import enums
from twlb.operator.handlers import OperatorConfig, make_settings, register

from twlb.spec import API_GROUP, API_VERSION, KIND, PLURAL

TRUSTCLUSTERS = f"{API_GROUP}/{API_VERSION}/{PLURAL}"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"
EVENTS = "v1/events"
#: kopf waits 5 s at exit for tasks started while it ran, which includes the emulator's
#: handler of any keep-alive connection a test client left open.
CLOSE = {"Connection": "close"}


class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side metadata fields a real API server sets."""

    _versions = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault(
                    "creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE:
                meta["resourceVersion"] = str(next(self._versions))
                if request.subresource is None and "spec" in data:
                    key = (request.resource, request.namespace, request.name)
                    try:
                        obj = self.objects[key]
                    except KeyError:
                        obj = None
                    if obj is not None and not obj.deleted:
                        gen = obj.raw.get("metadata", {}).get("generation", 1)
                        meta["generation"] = gen + 1
        return await super()._handle(request)


def trustcluster(name: str, namespace: str, spec: Mapping[str, Any], **meta: Any) -> dict:
    """A TrustCluster document as a client would send it."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": dict(spec),
    }


@dataclass
class EmulatedCluster:
    """A running emulator, its URL and the kubeconfig that points at it."""

    api: ApiServerEmulator
    url: str
    kubeconfig: Path

    def path(self, resource: str, namespace: str, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api" if group_version == "v1" else "/apis"
        out = f"{prefix}/{group_version}/namespaces/{namespace}/{plural}"
        return f"{out}/{name}" if name else out

    async def create(self, resource: str, obj: Mapping[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        r = await self.api.post(self.path(resource, ns), json=dict(obj), headers=CLOSE)
        r.raise_for_status()

    async def patch(self, resource: str, namespace: str, name: str, changes: Mapping) -> None:
        r = await self.api.patch(
            self.path(resource, namespace, name), json=dict(changes), headers=CLOSE
        )
        r.raise_for_status()

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        r = await self.api.delete(self.path(resource, namespace, name), headers=CLOSE)
        r.raise_for_status()

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.api.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def names(self, resource: str, namespace: str) -> set[str]:
        wanted = kmock.resource(resource)
        return {
            name
            for (res, ns, name), obj in list(self.api.objects.items())
            if res == wanted and ns == namespace and not obj.deleted
        }

    def writes(self, resource: str, namespace: str, name: str) -> int:
        """How many versions an object has had (1 = created and never changed)."""
        return len([v for v in self.api.objects[resource, namespace, name].history if v])


@contextlib.contextmanager
def _kubeconfig_env(url: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="twlb-kube-") as tmp:
        path = Path(tmp) / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                    "users": [{"name": "emulator", "user": {"token": "emulator"}}],
                    "contexts": [
                        {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}
                    ],
                }
            )
        )
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(path)
        try:
            yield path
        finally:
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old


@contextlib.asynccontextmanager
async def emulated_cluster() -> AsyncIterator[EmulatedCluster]:
    """An emulator serving the bundled core resources and the TrustCluster CRD's resource."""
    async with ApiServerEmulator() as api, kmock.Server(api):
        api.resources.load_bundled()
        api.resources[TRUSTCLUSTERS] = kmock.ResourceInfo(
            kind=KIND,
            singular=KIND.lower(),
            namespaced=True,
            verbs={"list", "watch", "get", "patch", "create", "delete"},
            subresources={"status"},
            shortnames={"tc"},
        )
        with _kubeconfig_env(str(api.url)) as kubeconfig:
            yield EmulatedCluster(api=api, url=str(api.url), kubeconfig=kubeconfig)


@contextlib.asynccontextmanager
async def running_operator(
    namespaces: list[str], config: OperatorConfig | None = None
) -> AsyncIterator[asyncio.Task]:
    """The real operator (all handlers) in a task of this loop; stopped on exit."""
    config = config or OperatorConfig()
    settings = make_settings(config)
    # No namespace listing: the emulator cannot serve a cluster-wide namespace list.
    settings.scanning.disabled = True
    # A handler that patched just before the stop waits this long for its resourceVersion
    # to come back on a watch stream that is already closed; keep test exits quick.
    settings.persistence.consistency_timeout = 0.5
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=register(config),
            settings=settings,
            standalone=True,
            namespaces=namespaces,
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), timeout=10)
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Poll `predicate()` until true; returns seconds waited or raises TimeoutError."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if predicate():
            return loop.time() - start
        if loop.time() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
