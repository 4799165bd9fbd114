"""Test harness: the real operator against kmock's Kubernetes API emulator (tests, bench).

It lives with the tests, not in the operator package, so that it never ships: it needs
the dev extras (kmock) and reaches into kmock's internals.

kmock 0.8 keeps objects exactly as clients send them. `ApiServerEmulator` adds only what
a real API server would fill in on its own: uid, namespace, a name from generateName,
resourceVersion, generation (bumped when the spec changes) and creationTimestamp, and the
scale subresource the CRD declares (`kubectl scale` reads and writes the object through it).
Everything the operator sends and reads still goes over HTTP to the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import yaml
from kmock._internal import enums
from pydantic import ValidationError
from twlb.operator.crd import render_crd
from twlb.operator.handlers import OperatorConfig, make_settings, register
from twlb.operator.kube import labels_match

from twlb.spec import API_GROUP, API_VERSION, KIND, PLURAL, TrustClusterSpec

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

    #: The last resourceVersion handed out (one sequence for all objects, as etcd's).
    _version = 0

    async def _handle(self, request: Any) -> Any:
        # kmock matches a request to its reactions by finding it in the request history,
        # scanned from the start for each reaction: serving would slow down with every
        # request served. Only the request being served is kept; objects hold the state.
        del self._requests[:-1]
        if request.resource is not None and request.subresource == "scale":
            return await self._serve_scale(request)
        data = request.data
        if request.resource is not None and isinstance(data, list):
            self._json_patch_preconditions(request)
            data.append(
                {"op": "add", "path": "/metadata/resourceVersion", "value": self._next_version()}
            )
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
                meta["resourceVersion"] = self._next_version()
            elif request.action == enums.action.UPDATE:
                meta["resourceVersion"] = self._next_version()
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

    async def _serve_scale(self, request: Any) -> Any:
        """The scale subresource as the API server serves it for a CRD that declares one:
        an autoscaling/v1 Scale read from (and written to) the object at the CRD's paths.

        A write becomes a merge patch of the object itself (validated against the spec
        model, as the server validates against the CRD's schema), so watchers see an
        ordinary MODIFIED event with a new generation, as they do from a real server.
        """
        paths = next(
            (p for res, p in SCALE_PATHS.items() if kmock.resource(res) == request.resource), None
        )
        key = (request.resource, request.namespace, request.name)
        if paths is None:
            raise kmock.KubernetesError(status=404, reason="NotFound", message="no scale")
        try:
            obj = self.objects[key]
        except KeyError:
            obj = None
        if obj is None or obj.deleted:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=str(key))
        if request.action == enums.action.UPDATE:
            replicas = (
                (request.data or {}).get("spec", {}).get("replicas")
                if isinstance(request.data, dict)
                else None
            )
            spec = {**obj.raw.get("spec", {}), _leaf(paths["specReplicasPath"]): replicas}
            try:
                TrustClusterSpec.model_validate(spec)
            except ValidationError as err:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=str(err)
                ) from None
            patch = {"spec": {_leaf(paths["specReplicasPath"]): replicas}}
            update = attrs.evolve(request, subresource=None, data=patch)
            self._requests.append(update)  # kmock serves only requests in its history
            await self._handle(update)
            obj = self.objects[key]
        raw = obj.raw
        scale = {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: raw["metadata"].get(k) for k in ("name", "namespace", "uid", "resourceVersion")
            },
            "spec": {"replicas": _at(raw, paths["specReplicasPath"]) or 0},
            "status": {"replicas": _at(raw, paths["statusReplicasPath"]) or 0},
        }
        selector = _at(raw, paths.get("labelSelectorPath", ""))
        if selector:
            scale["status"]["selector"] = selector
        return aiohttp.web.json_response(scale)

    def _next_version(self) -> str:
        ApiServerEmulator._version += 1
        return str(self._version)

    async def _serve_list(self, request: Any) -> Any:
        """kmock's list plus the server's part: the list's resourceVersion and labelSelector."""
        answer = await super()._serve_list(request)
        answer["metadata"]["resourceVersion"] = str(self._version)
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            answer["items"] = [i for i in answer["items"] if labels_match(i, wanted)]
        return answer

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """A watch from a listed resourceVersion sees only changes after it.

        kmock replays every existing object as ADDED; a client that listed first (kopf)
        would then handle the same object version twice and race itself.
        """
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else 0
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED":
                rv = event["object"].get("metadata", {}).get("resourceVersion", "")
                if rv.isdigit() and int(rv) <= since_version:
                    continue
            yield event

    def _json_patch_preconditions(self, request: Any) -> None:
        """A JSON patch whose `test` ops fail is refused with 422, as the API server does.

        kopf guards its finalizer and progress patches with a test of resourceVersion and
        re-reads the object on 422; any other answer makes it retry the stale patch.
        """
        try:
            current = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return
        if current.deleted:
            return
        tests = [op for op in request.data if op.get("op") == "test"]
        try:
            jsonpatch.apply_patch(current.raw, tests)
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPointerException) as err:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(err)) from None


#: The scale subresources the CRDs declare, by resource.
SCALE_PATHS: dict[str, dict[str, str]] = {
    TRUSTCLUSTERS: render_crd()["spec"]["versions"][0]["subresources"]["scale"]
}


def _at(obj: Mapping[str, Any], path: str) -> Any:
    """The value at a CRD JSON path such as `.status.readyBackends` (None if absent)."""
    for part in path.strip(".").split(".") if path else ():
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)  # type: ignore[assignment]
    return obj if path else None


def _leaf(path: str) -> str:
    """`.spec.backends` -> `backends` (scale paths of this CRD are one level under spec)."""
    return path.strip(".").split(".", 1)[1]


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


def _serve_resources(api: ApiServerEmulator) -> None:
    """The bundled core resources and the TrustCluster CRD's resource."""
    api.resources.load_bundled()
    api.resources[TRUSTCLUSTERS] = kmock.ResourceInfo(
        kind=KIND,
        singular=KIND.lower(),
        namespaced=True,
        verbs={"list", "watch", "get", "patch", "create", "delete"},
        subresources={"status", "scale"},
        shortnames={"tc"},
    )


@contextlib.asynccontextmanager
async def emulated_cluster() -> AsyncIterator[EmulatedCluster]:
    """An emulator in this event loop, with KUBECONFIG pointing at it while in use."""
    async with ApiServerEmulator() as api, kmock.Server(api):
        _serve_resources(api)
        with _kubeconfig_env(str(api.url)) as kubeconfig:
            yield EmulatedCluster(api=api, url=str(api.url), kubeconfig=kubeconfig)


#: Operator timings for tests: status every 0.5 s, trust asked with a 1 s timeout.
FAST_OPERATOR = OperatorConfig(status_interval_s=0.5, trust_timeout_s=1.0)


@contextlib.contextmanager
def kubeconfig_for(url: str) -> Iterator[Path]:
    """KUBECONFIG pointing at an API server URL while in use (e.g. `serve` in a child)."""
    with _kubeconfig_env(url) as path:
        yield path


async def serve(port: int) -> None:
    """Run the emulator on 127.0.0.1:port until cancelled (a stand-alone API server)."""
    async with ApiServerEmulator() as api, kmock.Server(api, port=port):
        _serve_resources(api)
        await asyncio.Event().wait()


def main() -> None:
    """`python tests/kube_harness.py --port P`: the emulator in its own process."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(args.port))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)


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


if __name__ == "__main__":
    main()
