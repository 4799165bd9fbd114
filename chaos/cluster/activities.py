"""Chaos Toolkit actions and probes for a TrustCluster on Kubernetes.

They talk to the API server the way chaostoolkit-kubernetes does (its
`create_k8s_api_client`: kubeconfig, in-pod config or KUBERNETES_* variables), so one set
of credentials serves both. A fault is injected by patching the TrustCluster, as a user
would, and the operator rolls it out; the value a patch replaced is kept in an annotation
on the TrustCluster so a rollback restores exactly that, even from another process.
Outputs carry `node`, `chaos_class` / `restored` and `at` for `twlb.chaos.journal`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

from chaoslib.exceptions import ActivityFailed
from chaoslib.types import Secrets
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from twlb.chaos.probes import HTTP_TIMEOUT_S, faulty_nodes_ejected
from twlb.operator.render import (
    ANNOTATION_FAULT_TYPE,
    COMPONENT_BACKEND,
    LABEL_CLUSTER,
    LABEL_COMPONENT,
    LABEL_NODE,
    TOKENS_CONTROL_KEY,
)

from twlb.spec import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    FaultSpec,
    NodeClass,
    TrustClusterSpec,
    assign_faults,
)

#: TrustCluster annotation holding the `spec.nodes` entry a chaos patch replaced, per index.
SAVED_ANNOTATION = f"{API_GROUP}/chaos-saved-node-{{index}}"
MERGE_PATCH = "application/merge-patch+json"


def _api(secrets: Secrets | None) -> client.ApiClient:
    """An API client built as chaostoolkit-kubernetes builds its own, except that a
    kubeconfig is read from the path KUBECONFIG names now (not when `kubernetes` was
    imported) and into a client of its own rather than the process-wide default."""
    import os

    from chaosk8s import create_k8s_api_client, get_config_path, has_local_config_file
    from kubernetes import config

    if has_local_config_file():
        context = (secrets or {}).get("KUBERNETES_CONTEXT") or os.environ.get("KUBERNETES_CONTEXT")
        return config.new_client_from_config(config_file=get_config_path(), context=context)
    return create_k8s_api_client(secrets)


def _get_cluster(api: client.ApiClient, cluster: str, ns: str) -> dict[str, Any]:
    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(
            API_GROUP, API_VERSION, ns, PLURAL, cluster, _request_timeout=HTTP_TIMEOUT_S * 5
        )
    except ApiException as err:
        raise ActivityFailed(
            f"cannot read TrustCluster {ns}/{cluster}: {err.status} {err.reason}"
        ) from None


def _patch_cluster(api: client.ApiClient, cluster: str, ns: str, body: dict[str, Any]) -> None:
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            API_GROUP, API_VERSION, ns, PLURAL, cluster, body,
            _content_type=MERGE_PATCH, _request_timeout=HTTP_TIMEOUT_S * 5,
        )  # fmt: skip
    except ApiException as err:
        raise ActivityFailed(
            f"cannot patch TrustCluster {ns}/{cluster}: {err.status} {err.reason} {err.body}"
        ) from None


def _spec(obj: dict[str, Any]) -> TrustClusterSpec:
    try:
        return TrustClusterSpec.model_validate(obj.get("spec") or {})
    except ValueError as err:
        raise ActivityFailed(f"TrustCluster spec is not valid: {err}") from None


def patch_node_fault(
    cluster: str,
    node_index: int,
    fault: dict[str, Any],
    ns: str = "twlb",
    secrets: Secrets = None,
) -> dict[str, Any]:
    """Pin `fault` on node `node_index` of a TrustCluster (its `spec.nodes`), saving the
    entry it replaces for `restore_node_fault`."""
    try:
        spec_fault = FaultSpec.model_validate(fault)
    except ValueError as err:
        raise ActivityFailed(f"invalid fault {fault!r}: {err}") from None
    api = _api(secrets)
    obj = _get_cluster(api, cluster, ns)
    spec = _spec(obj)
    if not 0 <= int(node_index) < spec.backends:
        raise ActivityFailed(f"node index {node_index} out of range for {spec.backends} backends")
    nodes = list((obj.get("spec") or {}).get("nodes") or [])
    previous = next((n for n in nodes if n.get("index") == int(node_index)), None)
    kept = [n for n in nodes if n.get("index") != int(node_index)]
    entry = dict(previous or {"index": int(node_index)})
    entry["fault"] = spec_fault.model_dump(mode="json", by_alias=True)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    key = SAVED_ANNOTATION.format(index=int(node_index))
    body: dict[str, Any] = {"spec": {"nodes": sorted([*kept, entry], key=lambda n: n["index"])}}
    if key not in annotations:  # a second patch must not overwrite the original
        body["metadata"] = {"annotations": {key: json.dumps(previous)}}
    _patch_cluster(api, cluster, ns, body)
    return {
        "node": f"{cluster}-node-{int(node_index)}",
        "cluster": cluster,
        "fault": entry["fault"],
        "chaos_class": spec_fault.node_class.value,
        "at": time.time(),
    }


def restore_node_fault(
    cluster: str, node_index: int, ns: str = "twlb", secrets: Secrets = None
) -> dict[str, Any]:
    """Put back the `spec.nodes` entry `patch_node_fault` replaced, and drop the record."""
    api = _api(secrets)
    obj = _get_cluster(api, cluster, ns)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    key = SAVED_ANNOTATION.format(index=int(node_index))
    if key not in annotations:
        raise ActivityFailed(
            f"TrustCluster {ns}/{cluster} has no saved fault for node {node_index}"
        )
    previous = json.loads(annotations[key])
    nodes = [
        n for n in (obj.get("spec") or {}).get("nodes") or [] if n.get("index") != int(node_index)
    ]
    if previous is not None:
        nodes.append(previous)
    body = {
        "metadata": {"annotations": {key: None}},
        "spec": {"nodes": sorted(nodes, key=lambda n: n["index"])},
    }
    _patch_cluster(api, cluster, ns, body)
    return {"node": f"{cluster}-node-{int(node_index)}", "restored": True, "at": time.time()}


def _backend_deployments(api: client.ApiClient, cluster: str, ns: str) -> list[client.V1Deployment]:
    wanted = {LABEL_CLUSTER: cluster, LABEL_COMPONENT: COMPONENT_BACKEND}
    selector = ",".join(f"{k}={v}" for k, v in wanted.items())
    try:
        items = (
            client.AppsV1Api(api)
            .list_namespaced_deployment(
                ns, label_selector=selector, _request_timeout=HTTP_TIMEOUT_S * 5
            )
            .items
        )
    except ApiException as err:
        raise ActivityFailed(
            f"cannot list Deployments in {ns}: {err.status} {err.reason}"
        ) from None
    # Checked here too: an API server (or emulator) that ignores the selector must not
    # make the balancer's Deployment count as a node's.
    return [
        d for d in items if all((d.metadata.labels or {}).get(k) == v for k, v in wanted.items())
    ]


def wait_node_rolled_out(
    cluster: str,
    node_index: int,
    ns: str = "twlb",
    timeout_s: float = 120.0,
    secrets: Secrets = None,
) -> dict[str, Any]:
    """Wait until node `node_index`'s Deployment carries the fault the spec assigns it and
    has rolled out (all replicas updated and available)."""
    api = _api(secrets)
    name = f"{cluster}-node-{int(node_index)}"
    deadline = time.monotonic() + timeout_s
    last = "not seen"
    while time.monotonic() < deadline:
        spec = _spec(_get_cluster(api, cluster, ns))
        wanted = next(a.fault for a in assign_faults(spec, cluster) if a.index == int(node_index))
        for d in _backend_deployments(api, cluster, ns):
            if (d.metadata.labels or {}).get(LABEL_NODE) != name:
                continue
            fault = (d.metadata.annotations or {}).get(ANNOTATION_FAULT_TYPE)
            st = d.status
            want = d.spec.replicas or 0
            done = (
                fault == wanted.type.value
                and (st.observed_generation or 0) >= (d.metadata.generation or 0)
                and (st.updated_replicas or 0) == want
                and (st.available_replicas or 0) == want
                and (st.replicas or 0) == want
            )
            if done:
                return {"deployment": name, "fault": fault, "at": time.time()}
            last = f"fault {fault}, {st.updated_replicas}/{want} updated, {st.available_replicas} available"
        time.sleep(1.0)
    raise ActivityFailed(f"Deployment of {name} did not roll out within {timeout_s}s ({last})")


def one_deployment_per_node(cluster: str, ns: str = "twlb", secrets: Secrets = None) -> bool:
    """True when every node of the TrustCluster has exactly one backend Deployment (by its
    node label) and no Deployment belongs to a node the spec does not have."""
    api = _api(secrets)
    spec = _spec(_get_cluster(api, cluster, ns))
    wanted = {a.name for a in assign_faults(spec, cluster)}
    counts = Counter(
        (d.metadata.labels or {}).get(LABEL_NODE, "")
        for d in _backend_deployments(api, cluster, ns)
    )
    problems = {n: counts.get(n, 0) for n in wanted if counts.get(n, 0) != 1}
    problems |= {n: c for n, c in counts.items() if n not in wanted}
    if problems:
        raise ActivityFailed(f"Deployments per node are not one each: {problems}")
    return True


def deployments_match_spec(cluster: str, ns: str = "twlb", secrets: Secrets = None) -> bool:
    """True when every node's Deployment carries the fault the spec assigns it (the
    operator has reconciled the latest spec)."""
    api = _api(secrets)
    spec = _spec(_get_cluster(api, cluster, ns))
    have = {
        (d.metadata.labels or {}).get(LABEL_NODE): (d.metadata.annotations or {}).get(
            ANNOTATION_FAULT_TYPE
        )
        for d in _backend_deployments(api, cluster, ns)
    }
    stale = {
        a.name: {"spec": a.fault.type.value, "deployment": have.get(a.name)}
        for a in assign_faults(spec, cluster)
        if have.get(a.name) != a.fault.type.value
    }
    if stale:
        raise ActivityFailed(f"Deployments not reconciled with the spec: {stale}")
    return True


def faulty_nodes_ejected_in_cluster(
    cluster: str,
    balancer_url: str,
    within_s: float = 10.0,
    rate: float = 100.0,
    ns: str = "twlb",
    secrets: Secrets = None,
    balancer_admin_url: str | None = None,
) -> float:
    """Seconds until the balancer ejected every node the TrustCluster makes faulty (0.0
    when none is), while a verified load runs through `balancer_url`; ActivityFailed after
    `within_s`. /trust is read on `balancer_admin_url` (a replica's admin listener: the
    traffic port proxies /trust to the backends)."""
    spec = _spec(_get_cluster(_api(secrets), cluster, ns))
    faulty = [
        a.name for a in assign_faults(spec, cluster) if a.fault.node_class != NodeClass.HEALTHY
    ]
    return faulty_nodes_ejected(
        nodes=faulty,
        url=balancer_url,
        admin_url=balancer_admin_url,
        within_s=within_s,
        rate=rate,
    )


def control_token(cluster: str, ns: str = "twlb", secrets: Secrets = None) -> str:
    """The cluster's backend control token from its Secret (`<cluster>-tokens`)."""
    import base64

    try:
        secret = client.CoreV1Api(_api(secrets)).read_namespaced_secret(
            f"{cluster}-tokens", ns, _request_timeout=HTTP_TIMEOUT_S * 5
        )
    except ApiException as err:
        raise ActivityFailed(
            f"cannot read Secret {ns}/{cluster}-tokens: {err.status} {err.reason}"
        ) from None
    data = (secret.data or {}).get(TOKENS_CONTROL_KEY)
    if not data:
        raise ActivityFailed(f"Secret {ns}/{cluster}-tokens has no {TOKENS_CONTROL_KEY}")
    return base64.b64decode(data).decode()


def set_node_fault_via_control(
    cluster: str,
    node: str,
    control_url: str,
    fault: dict[str, Any] | None = None,
    ns: str = "twlb",
    secrets: Secrets = None,
) -> dict[str, Any]:
    """Switch one node's fault at run time through its control endpoint (reached at
    `control_url`, e.g. a `kubectl port-forward` of its Service), with the token from the
    cluster's Secret. The TrustCluster is left alone: this is a transient fault. Without
    `fault`, the node gets back the fault its TrustCluster assigns (a rollback)."""
    import httpx

    if fault is None:
        api = _api(secrets)
        assigned = {
            a.name: a.fault for a in assign_faults(_spec(_get_cluster(api, cluster, ns)), cluster)
        }
        if node not in assigned:
            raise ActivityFailed(f"TrustCluster {ns}/{cluster} has no node {node}")
        spec = assigned[node]
    else:
        try:
            spec = FaultSpec.model_validate(fault)
        except ValueError as err:
            raise ActivityFailed(f"invalid fault {fault!r}: {err}") from None
    token = control_token(cluster, ns, secrets)
    try:
        r = httpx.put(
            control_url.rstrip("/") + "/control/fault",
            json=spec.model_dump(mode="json", by_alias=True),
            headers={"Authorization": f"Bearer {token}"},
            timeout=HTTP_TIMEOUT_S,
        )
    except httpx.HTTPError as err:
        raise ActivityFailed(
            f"cannot reach {node}'s control endpoint {control_url}: {err!r}"
        ) from None
    if r.status_code != 200:
        raise ActivityFailed(f"{node} refused the fault ({r.status_code}): {r.text[:300]}")
    out: dict[str, Any] = {"node": node, "fault": r.json().get("fault"), "at": time.time()}
    if spec.node_class is NodeClass.HEALTHY:
        out["restored"] = True
    else:
        out["chaos_class"] = spec.node_class.value
    return out


def terminate_pods_after(
    label_selector: str,
    delay_s: float = 2.0,
    ns: str = "twlb",
    grace_period: int = 0,
    secrets: Secrets = None,
) -> dict[str, Any]:
    """Terminate the pods matching `label_selector` `delay_s` from now, without waiting:
    the after-hypothesis that follows then measures the steady state across the kill."""
    from chaosk8s.pod.actions import terminate_pods

    def kill() -> None:
        terminate_pods(
            label_selector=label_selector, all=True, ns=ns, grace_period=grace_period,
            secrets=secrets,
        )  # fmt: skip

    timer = threading.Timer(delay_s, kill)
    timer.daemon = True
    timer.start()
    return {"label_selector": label_selector, "namespace": ns, "kill_at": time.time() + delay_s}
