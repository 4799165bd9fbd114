"""Backends from the cluster: the balancer follows the backends' Kubernetes Services.

With `--discover-services SELECTOR` the balancer lists the Services of its namespace that
carry every label of SELECTOR and keeps one backend per Service,
`http://NAME.NAMESPACE.svc:PORT` (the Service's port named `--discover-port`), then
watches them: a Service created joins the backends, one deleted leaves them, at once and
without a restart, so the trust evidence of every backend that stays is kept. The
operator's TrustCluster gives each node its own Service, so a node keeps its identity
(and its evidence) across pod restarts, and `kubectl scale` changes the backends without
touching the balancer's pod template. Every balancer replica follows the Services on its
own: they all see the same set.

The watch runs on a thread of its own (the official client is synchronous) and hands each
new set to the event loop, where the balancer adds and removes backends in sorted order
(order matters to jump hashing: replicas that learn the same set agree). A watch that
ends or fails is started again from a fresh list, after a back-off when it failed;
between lists the set is never emptied by an error, only by the Services going away.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from twlb.balancer.upstream import BackendURLError, normalize_backend_url

log = logging.getLogger("twlb.balancer.discovery")

#: Where a pod finds its own namespace (the service account's mount).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Seconds the first list may take before the balancer starts serving without it.
FIRST_LIST_S = 10.0
#: Back-off after a failed list or watch: doubling from the first, up to the second.
RETRY_S = (0.5, 30.0)


class DiscoveryError(ValueError):
    """A discovery setting that cannot work (reported as a usage error)."""


def parse_selector(selector: str) -> dict[str, str]:
    """An equality label selector `k=v,k2=v2` as a dict; DiscoveryError when it is not one."""
    labels: dict[str, str] = {}
    for term in selector.split(","):
        key, sep, value = term.strip().replace("==", "=").partition("=")
        if not sep or not key.strip() or any(c in key + value for c in "!()<> "):
            raise DiscoveryError(
                f"label selector {selector!r}: each term must be key=value (got {term!r})"
            )
        labels[key.strip()] = value.strip()
    return labels


def own_namespace() -> str | None:
    """The pod's namespace, when running in one."""
    try:
        return NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


def service_url(service: Any, namespace: str, port: str) -> str | None:
    """A Service's backend URL: its DNS name and the port named `port` (or numbered so, or
    its only port); None when it has no such port."""
    ports = list(getattr(service.spec, "ports", None) or [])
    chosen = next((p for p in ports if p.name == port), None)
    if chosen is None and port.isdigit():
        chosen = next((p for p in ports if p.port == int(port)), None)
    if chosen is None and len(ports) == 1 and not port.isdigit() and ports[0].name is None:
        chosen = ports[0]
    if chosen is None:
        return None
    try:
        return normalize_backend_url(
            f"http://{service.metadata.name}.{namespace}.svc:{chosen.port}"
        )
    except BackendURLError:
        return None


def _matches(labels: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    have = labels or {}
    return all(have.get(k) == v for k, v in wanted.items())


class ServiceDiscovery:
    """Follows the Services matching `selector` in `namespace`; calls `publish(urls)`
    (on the thread that runs the watch) each time the set of backend URLs changes."""

    def __init__(
        self,
        selector: str,
        namespace: str,
        port: str,
        resync_s: float,
        publish: Callable[[frozenset[str]], None],
        api: Any = None,
    ) -> None:
        self.selector = selector
        self.labels = parse_selector(selector)
        self.namespace = namespace
        self.port = port
        self.resync_s = resync_s
        self.publish = publish
        self._api = api
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._services: dict[str, Any] = {}
        self.published: frozenset[str] | None = None
        self.lists = 0  # full lists done (each watch starts from one)

    @property
    def api(self) -> Any:
        if self._api is None:
            import kubernetes.client
            import kubernetes.config

            conf = kubernetes.client.Configuration()
            try:
                kubernetes.config.load_incluster_config(client_configuration=conf)
            except kubernetes.config.ConfigException:  # outside a pod: KUBECONFIG
                kubernetes.config.load_kube_config(client_configuration=conf)
            self._api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(conf))
        return self._api

    # ---- the set ------------------------------------------------------------------------
    def _urls(self) -> frozenset[str]:
        urls = set()
        for svc in self._services.values():
            url = service_url(svc, self.namespace, self.port)
            if url is None:
                log.warning(
                    "service %s has no usable port %r; left out", svc.metadata.name, self.port
                )
            else:
                urls.add(url)
        return frozenset(urls)

    def _changed(self) -> None:
        urls = self._urls()
        if urls != self.published:
            self.published = urls
            self.publish(urls)

    def _take(self, services: Iterable[Any]) -> None:
        self._services = {
            s.metadata.name: s
            for s in services
            if _matches(s.metadata.labels, self.labels) and s.metadata.deletion_timestamp is None
        }

    def list_once(self) -> str:
        """List the Services now and publish their set; returns the list's resourceVersion."""
        answer = self.api.list_namespaced_service(
            self.namespace, label_selector=self.selector, _request_timeout=FIRST_LIST_S
        )
        self._take(answer.items)
        self.lists += 1
        self._changed()
        return answer.metadata.resource_version

    def _on_event(self, kind: str, svc: Any) -> None:
        name = svc.metadata.name
        if (
            kind == "DELETED"
            or not _matches(svc.metadata.labels, self.labels)
            or svc.metadata.deletion_timestamp is not None
        ):
            self._services.pop(name, None)
        else:
            self._services[name] = svc
        self._changed()

    # ---- the watch ----------------------------------------------------------------------
    def _watch(self, version: str) -> None:
        """Stream changes from `version` until the server ends the watch (about every
        `resync_s`), it fails, or stop()."""
        import kubernetes.watch

        watch = kubernetes.watch.Watch()
        stream = watch.stream(
            self.api.list_namespaced_service,
            self.namespace,
            label_selector=self.selector,
            resource_version=version,
            timeout_seconds=int(self.resync_s),
            # A server that keeps the stream open past its timeout is cut off here.
            _request_timeout=(FIRST_LIST_S, self.resync_s + 10.0),
        )
        try:
            for event in stream:
                if self._stop.is_set():
                    return
                kind = event.get("type")
                if kind == "ERROR":  # e.g. 410 Gone: the version is too old, list again
                    return
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(kind, event["object"])
        finally:
            watch.stop()

    def _run(self, version: str | None) -> None:
        delay = RETRY_S[0]
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self.list_once()
                self._watch(version)
                delay = RETRY_S[0]
            except Exception as err:  # the API is away: keep the set, try again later
                log.warning(
                    "discovery of services %s in %s failed: %s; again in %.1fs",
                    self.selector, self.namespace, err, delay,
                )  # fmt: skip
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, RETRY_S[1])
            version = None

    async def start(self) -> None:
        """List once (up to FIRST_LIST_S: the balancer serves its first request with the
        cluster's backends), then follow the changes on a daemon thread."""
        version = None
        try:
            version = await asyncio.wait_for(asyncio.to_thread(self.list_once), FIRST_LIST_S)
            await asyncio.sleep(0)  # the set it published joins the balancer now
            log.info("discovered %d backends from services %s", len(self._services), self.selector)
        except Exception as err:
            log.warning("first discovery of services %s failed: %s", self.selector, err)
        self._thread = threading.Thread(
            target=self._run, args=(version,), name="twlb-discovery", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def follow(balancer: Any, loop: asyncio.AbstractEventLoop, previous: set[str]) -> Callable:
    """A `publish` for `ServiceDiscovery` that brings `balancer`'s backends in line on
    `loop`: discovered backends join (sorted), ones no longer discovered leave; backends
    given otherwise (`--backend`, the admin API) are left alone."""

    def apply(urls: frozenset[str]) -> None:
        for url in sorted(urls - set(balancer.backends)):
            balancer.add_backend(url)
            log.warning("backend %s joined (discovered)", url)
        for url in sorted(previous - urls):
            if balancer.remove_backend(url):
                log.warning("backend %s left (its service is gone)", url)
        previous.clear()
        previous.update(urls)

    def publish(urls: frozenset[str]) -> None:
        loop.call_soon_threadsafe(apply, urls)

    return publish


async def start_discovery(balancer: Any) -> ServiceDiscovery | None:
    """Follow the backends' Services when the balancer's settings ask for it."""
    s = balancer.settings
    if not s.discover_services:
        return None
    namespace = s.discover_namespace or own_namespace()
    if not namespace:
        raise DiscoveryError("--discover-services needs --discover-namespace outside a pod")
    discovery = ServiceDiscovery(
        s.discover_services,
        namespace,
        s.discover_port,
        s.discover_resync_s,
        follow(balancer, asyncio.get_running_loop(), set()),
    )
    await discovery.start()
    return discovery
