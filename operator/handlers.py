"""The kopf handlers of the TrustCluster operator: reconcile children, write status, clean up.

`register()` puts every handler in a registry with the given `OperatorConfig`, so the
CLI, the tests and the benchmark run the same operator with their own settings. The
handlers only do I/O; what to create (render), what to change (reconcile) and what the
status says (status) are pure functions of other modules.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError
from twlb.operator import render
from twlb.operator.kube import KubeApi, KubeError
from twlb.operator.reconcile import Key, Plan, key_of, plan
from twlb.operator.status import (
    PHASE_INVALID,
    TrustReading,
    invalid_status,
    summarize,
)

from twlb.spec import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    SpecError,
    TrustClusterSpec,
    describe_validation_error,
)

log = logging.getLogger("twlb.operator")

#: Kinds a TrustCluster owns; listed to find what exists and what is left over.
OWNED_KINDS = (
    "Secret",
    "ConfigMap",
    "Deployment",
    "Service",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "PodDisruptionBudget",
)
#: Created before the rest: pods refer to them (the balancer's pod to its account).
FIRST_KINDS = frozenset({"Secret", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"})

NODE_PORT_RANGE = range(30000, 32768)


@dataclass(frozen=True)
class OperatorConfig:
    """Settings of one operator process."""

    status_interval_s: float = 10.0
    trust_threshold: float = 0.5
    trust_timeout_s: float = 2.0
    api_workers: int = 8
    handler_workers: int = 16


def make_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    """kopf settings: our own finalizer and annotation prefix, events only when we say."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # Handler logs stay logs; Kubernetes events are posted explicitly on transitions.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = config.handler_workers
    settings.queueing.error_delays = (1, 2, 5, 10, 30)
    return settings


def validate(name: str, spec: Any, annotations: Any) -> tuple[TrustClusterSpec, int | None]:
    """The spec as the model sees it and the balancer's fixed NodePort, or SpecError."""
    if len(name) > render.MAX_CLUSTER_NAME or not name[:1].isalpha():
        raise SpecError(
            f"metadata.name: must start with a letter and have at most "
            f"{render.MAX_CLUSTER_NAME} characters (children add suffixes)"
        )
    try:
        parsed = TrustClusterSpec.model_validate(dict(spec or {}))
    except ValidationError as err:
        raise SpecError(describe_validation_error(err)) from None
    raw_port = (annotations or {}).get(render.ANNOTATION_NODE_PORT)
    node_port = None
    if raw_port is not None:
        try:
            node_port = int(raw_port)
        except ValueError:
            node_port = -1
        if node_port not in NODE_PORT_RANGE:
            raise SpecError(
                f"metadata.annotations[{render.ANNOTATION_NODE_PORT}]: {raw_port!r} is not "
                f"a NodePort ({NODE_PORT_RANGE.start}..{NODE_PORT_RANGE.stop - 1})"
            )
    return parsed, node_port


def _now() -> datetime:
    return datetime.now(UTC)


class Operator:
    """The handlers' shared state: one API client and one pool for fanning out calls."""

    def __init__(self, config: OperatorConfig, api: KubeApi | None = None) -> None:
        self.config = config
        self._api = api
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.api_workers, thread_name_prefix="twlb-api")
        self._http: httpx.AsyncClient | None = None
        self._locks: dict[str, threading.Lock] = {}
        self.closed = False

    @property
    def api(self) -> KubeApi:
        # Built on first use, after kopf has logged in, so credentials exist by then.
        with self._lock:
            if self._api is None:
                self._api = KubeApi()
            return self._api

    async def close(self) -> None:
        self.closed = True
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._api is not None:
                # Open keep-alive connections would outlive the operator otherwise.
                self._api.close()
                self._api = None

    # ---- reading --------------------------------------------------------------------

    def live_children(self, owner: render.Owner) -> list[dict[str, Any]]:
        selector = {render.LABEL_CLUSTER: owner.name}
        lists = self._pool.map(
            lambda kind: self.api.list(kind, owner.namespace, selector), OWNED_KINDS
        )
        return [obj for objs in lists for obj in objs if _owned_by(obj, owner)]

    async def read_trust(self, url: str) -> TrustReading:
        if self._http is None:
            # One client for every read: building one costs a TLS context (~0.2 s of CPU).
            self._http = httpx.AsyncClient(timeout=self.config.trust_timeout_s)
        try:
            r = await self._http.get(url.rstrip("/") + "/trust")
            r.raise_for_status()
            backends = r.json().get("backends")
            if not isinstance(backends, list):
                raise ValueError("answer has no 'backends' list")
            return TrustReading(url=url, read_at=_now(), backends=backends)
        except (httpx.HTTPError, ValueError) as err:
            return TrustReading(url=url, read_at=_now(), error=f"{type(err).__name__}: {err}")

    # ---- writing --------------------------------------------------------------------

    def apply(self, owner: render.Owner, todo: Plan) -> dict[Key, dict[str, Any] | None]:
        """Carry out a plan; returns each touched object as the server answered (None: gone)."""
        ns = owner.namespace
        first = [o for o in todo.create if o["kind"] in FIRST_KINDS]
        rest = [o for o in todo.create if o["kind"] not in FIRST_KINDS]
        done: dict[Key, dict[str, Any] | None] = {}
        # Pods refer to the Secret and ConfigMaps, so those exist before any Deployment.
        for obj, answer in zip(first, self._pool.map(self.api.create, first), strict=True):
            done[key_of(obj)] = answer
        calls: list[tuple[Key, Callable[[], dict[str, Any] | None]]] = [
            (key_of(o), lambda o=o: self.api.create(o)) for o in rest
        ]
        calls += [(k, lambda k=k, p=p: self.api.patch(k[0], ns, k[1], p)) for k, p in todo.patch]
        calls += [(k, lambda k=k: self.api.delete(k[0], ns, k[1]) and None) for k in todo.delete]
        answers = self._pool.map(lambda call: call[1](), calls)
        for (key, _), answer in zip(calls, answers, strict=True):
            done[key] = answer
        return done

    def reconcile(
        self,
        owner: render.Owner,
        spec: TrustClusterSpec,
        node_port: int | None,
    ) -> tuple[Plan, list[dict[str, Any]]]:
        """Make the children match the spec; returns what was done and the live objects."""
        # The handlers and the timer may both reconcile one cluster; never at once.
        with self._locks.setdefault(owner.uid, threading.Lock()):
            return self._reconcile(owner, spec, node_port)

    def _reconcile(
        self, owner: render.Owner, spec: TrustClusterSpec, node_port: int | None
    ) -> tuple[Plan, list[dict[str, Any]]]:
        live = self.live_children(owner)
        model_name = render.model_config_map_name(owner, spec)
        model = next(
            (o for o in live if o["kind"] == "ConfigMap" and o["metadata"]["name"] == model_name),
            None,
        )
        if model is None and spec.balancer.model_config_map:
            model = self.api.get("ConfigMap", owner.namespace, model_name)
        tokens = render.tokens_secret_name(owner)
        secret = next(
            (o for o in live if o["kind"] == "Secret" and o["metadata"]["name"] == tokens), None
        )
        # Tokens are generated once; the live Secret's values are never rewritten (one it
        # lacks, such as the xDS token of a cluster from before it, is added).
        kept = render.secret_values(secret) if secret is not None else {}
        token_keys = (render.TOKENS_ADMIN_KEY, render.TOKENS_CONTROL_KEY, render.TOKENS_XDS_KEY)
        tokens_now = {k: kept.get(k) or secrets.token_urlsafe(24) for k in token_keys}
        desired = render.render_children(
            owner,
            spec,
            admin_token=tokens_now[render.TOKENS_ADMIN_KEY],
            control_token=tokens_now[render.TOKENS_CONTROL_KEY],
            xds_token=tokens_now[render.TOKENS_XDS_KEY],
            node_port=node_port,
            model_ready=render.model_ready(model),
        )
        todo = plan(desired, live)
        added = {k: v for k, v in tokens_now.items() if k not in kept}
        if secret is not None and added:
            todo.patch.append((("Secret", tokens), {"stringData": added}))
        if not todo.empty:
            by_key = {key_of(o): o for o in live}
            for key, answer in self.apply(owner, todo).items():
                if answer is None:
                    by_key.pop(key, None)
                else:
                    by_key[key] = {**answer, "kind": key[0]}
            live = list(by_key.values())
        return todo, live

    def delete_children(self, owner: render.Owner) -> int:
        live = self.live_children(owner)
        done = self._pool.map(
            lambda o: self.api.delete(o["kind"], owner.namespace, o["metadata"]["name"]), live
        )
        return sum(1 for d in done if d)


def _owned_by(obj: dict[str, Any], owner: render.Owner) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid for r in refs)


def _post_phase_event(body: Any, old: Any, new: dict[str, Any]) -> None:
    old_phase = (old or {}).get("phase")
    if old_phase == new["phase"]:
        return
    kind = "Normal" if new["phase"] in ("Running", "Pending") else "Warning"
    kopf.event(
        body,
        type=kind,
        reason=new["phase"],
        message=f"phase {old_phase or 'None'} -> {new['phase']}: {new.get('message', '')}",
    )


def register(
    config: OperatorConfig | None = None,
    registry: kopf.OperatorRegistry | None = None,
    api: KubeApi | None = None,
) -> kopf.OperatorRegistry:
    """A registry holding every TrustCluster handler, configured by `config`."""
    config = config or OperatorConfig()
    registry = registry or kopf.OperatorRegistry()
    op = Operator(config, api)
    resource = (API_GROUP, API_VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await op.close()

    def mark_invalid(body: Any, status: Any, patch: kopf.Patch, gen: Any, err: SpecError) -> None:
        new = invalid_status(str(err), status, gen, _now())
        patch.status.update(new)
        if (status or {}).get("phase") != PHASE_INVALID or status.get("message") != str(err):
            kopf.event(body, type="Warning", reason="InvalidSpec", message=str(err))

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    def reconcile_cluster(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        name: str,
        namespace: str,
        uid: str,
        patch: kopf.Patch,
        logger: logging.Logger,
        **_: Any,
    ) -> None:
        """Create, update or adopt every child so that it matches the spec."""
        generation = meta.get("generation")
        try:
            parsed, node_port = validate(name, spec, meta.annotations)
        except SpecError as err:
            logger.warning("invalid spec: %s", err)
            mark_invalid(body, status, patch, generation, err)
            return
        owner = render.Owner(name=name, namespace=namespace, uid=uid)
        try:
            todo, live = op.reconcile(owner, parsed, node_port)
        except KubeError as err:
            raise kopf.TemporaryError(str(err), delay=2) from None
        if not todo.empty:
            logger.info("reconciled: %s", todo.summary())
            kopf.event(body, type="Normal", reason="Reconciled", message=todo.summary())
        deployments = [o for o in live if o["kind"] == "Deployment"]
        new = summarize(
            owner,
            parsed,
            deployments,
            None,
            status,
            generation,
            config.trust_threshold,
            _now(),
        )
        patch.status.update(new)
        _post_phase_event(body, status, new)

    @kopf.on.delete(*resource, registry=registry)
    def delete_cluster(name: str, namespace: str, uid: str, logger: logging.Logger, **_: Any):
        """Delete the children now (the garbage collector would, later, via owner refs)."""
        owner = render.Owner(name=name, namespace=namespace, uid=uid)
        try:
            n = op.delete_children(owner)
        except KubeError as err:
            raise kopf.TemporaryError(str(err), delay=2) from None
        logger.info("deleted %d children", n)

    @kopf.timer(
        *resource,
        interval=config.status_interval_s,
        # The reconcile handler writes the first status; an immediate tick would only race it.
        initial_delay=config.status_interval_s,
        registry=registry,
    )
    async def refresh_status(
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        name: str,
        namespace: str,
        uid: str,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        """Converge the children, then readiness from them and trust from /trust.

        Reconciling here too repairs drift (a deleted Service, an edited Deployment) and
        picks up a model published into the model ConfigMap. Only when the handlers have
        seen this generation: otherwise the timer's spec could be older than theirs.
        """
        try:
            parsed, node_port = validate(name, spec, meta.annotations)
        except SpecError:
            return  # the reconcile handler has already said so in the status
        owner = render.Owner(name=name, namespace=namespace, uid=uid)
        # /trust is on a replica's admin listener (the traffic port proxies every path).
        url = meta.annotations.get(render.ANNOTATION_BALANCER_URL) or render.balancer_admin_url(
            owner
        )
        current = (status or {}).get("observedGeneration") == meta.get("generation")
        selector = {render.LABEL_CLUSTER: name}

        def children() -> list[dict[str, Any]]:
            if not current:
                return op.api.list("Deployment", namespace, selector)
            todo, live = op.reconcile(owner, parsed, node_port)
            if not todo.empty:
                kopf.event(body, type="Normal", reason="Reconciled", message=todo.summary())
            return [o for o in live if o["kind"] == "Deployment"]

        if op.closed:
            return  # a tick that outlived the operator's cleanup
        try:
            deployments, trust = await asyncio.gather(
                asyncio.to_thread(children), op.read_trust(url)
            )
        except KubeError as err:
            raise kopf.TemporaryError(str(err), delay=2) from None
        except RuntimeError:
            if op.closed:  # the pool shut down under this tick
                return
            raise
        deployments = [d for d in deployments if _owned_by(d, owner)]
        new = summarize(
            owner,
            parsed,
            deployments,
            trust,
            status,
            # Only the reconcile handler observes a generation; the timer only reads.
            (status or {}).get("observedGeneration"),
            config.trust_threshold,
            trust.read_at,
        )
        # The body a timer sees can predate the reconcile handler's last write.
        new.pop("observedGeneration")
        patch.status.update(new)
        _post_phase_event(body, status, new)

    return registry
