"""The operator's access to the Kubernetes API for the objects a TrustCluster owns.

A thin layer over the official client's typed APIs: bodies and answers stay plain dicts
(the render functions' currency), credentials come from the service account in a pod
or from KUBECONFIG elsewhere, and a missing object is `None`, not an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

#: kind -> (API class, the name shared by its methods, e.g. read_<suffix>).
KINDS: dict[str, tuple[type, str]] = {
    "Deployment": (kubernetes.client.AppsV1Api, "namespaced_deployment"),
    "Service": (kubernetes.client.CoreV1Api, "namespaced_service"),
    "ConfigMap": (kubernetes.client.CoreV1Api, "namespaced_config_map"),
    "Secret": (kubernetes.client.CoreV1Api, "namespaced_secret"),
    "ServiceAccount": (kubernetes.client.CoreV1Api, "namespaced_service_account"),
    "Role": (kubernetes.client.RbacAuthorizationV1Api, "namespaced_role"),
    "RoleBinding": (kubernetes.client.RbacAuthorizationV1Api, "namespaced_role_binding"),
    "PodDisruptionBudget": (kubernetes.client.PolicyV1Api, "namespaced_pod_disruption_budget"),
}

MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """An API call that failed for a reason other than 'not found'."""

    def __init__(self, verb: str, kind: str, name: str, err: ApiException) -> None:
        super().__init__(f"{verb} {kind} {name}: {err.status} {err.reason}")
        self.status = err.status


def load_configuration() -> kubernetes.client.Configuration:
    """Credentials of a pod's service account, else of the KUBECONFIG file."""
    conf = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=conf)
    except kubernetes.config.ConfigException:
        # The client reads KUBECONFIG once at import; read it now so it can be set later.
        path = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
        kubernetes.config.load_kube_config(
            config_file=os.path.expanduser(path), client_configuration=conf
        )
    conf.connection_pool_maxsize = 32
    return conf


def _answer(response: Any) -> dict[str, Any]:
    return json.loads(response.data) if response.data else {}


def labels_match(obj: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in wanted.items())


class KubeApi:
    """Create, read, patch, list and delete namespaced objects of the kinds in KINDS."""

    def __init__(self, configuration: kubernetes.client.Configuration | None = None) -> None:
        self.client = kubernetes.client.ApiClient(configuration or load_configuration())
        self._apis = {api: api(self.client) for api, _ in KINDS.values()}

    def close(self) -> None:
        self.client.close()

    def _call(self, verb: str, kind: str, *args: Any, **kwargs: Any) -> Any:
        api_class, suffix = KINDS[kind]
        method = getattr(self._apis[api_class], f"{verb}_{suffix}")
        return method(*args, _preload_content=False, **kwargs)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _answer(self._call("read", kind, name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise KubeError("read", kind, name, err) from None

    def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects of `kind` carrying all `selector` labels."""
        label_selector = ",".join(f"{k}={v}" for k, v in selector.items())
        try:
            items = _answer(self._call("list", kind, namespace, label_selector=label_selector)).get(
                "items", []
            )
        except ApiException as err:
            raise KubeError("list", kind, label_selector, err) from None
        # Filtering again costs nothing and keeps us right behind a server that ignores it.
        return [dict(i, kind=kind) for i in items if labels_match(i, selector)]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        try:
            return _answer(self._call("create", kind, meta["namespace"], dict(obj)))
        except ApiException as err:
            raise KubeError("create", kind, meta["name"], err) from None

    def patch(
        self, kind: str, namespace: str, name: str, changes: Mapping[str, Any]
    ) -> dict[str, Any]:
        """JSON merge patch: lists in `changes` replace the live lists whole."""
        try:
            return _answer(
                self._call("patch", kind, name, namespace, dict(changes), _content_type=MERGE_PATCH)
            )
        except ApiException as err:
            raise KubeError("patch", kind, name, err) from None

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete (children go in the background); False if it was already gone."""
        try:
            self._call("delete", kind, name, namespace, propagation_policy="Background")
        except ApiException as err:
            if err.status == 404:
                return False
            raise KubeError("delete", kind, name, err) from None
        return True
