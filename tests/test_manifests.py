"""k8s/ and everything the operator renders: valid for Kubernetes 1.31, hardened, least privilege."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from twlb.operator import render
from twlb.operator.kube import KINDS
from twlb.operator.reconcile import plan

from twlb.spec import TrustClusterSpec, load_trustcluster

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
#: The Kubernetes version every manifest is validated against (kind's default node image).
KUBERNETES_VERSION = "1.31"
OWNER = render.Owner(name="lab", namespace="twlb", uid="0f4c2b64-3c2e-4d4e-9a55-1f1b5d0c2a77")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    # Top-level manifests (what `kubectl apply -f k8s/` applies) and the on-demand jobs.
    for path in sorted([*K8S.glob("*.yaml"), *(K8S / "jobs").glob("*.yaml")]):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def rendered_objects() -> list[tuple[str, dict[str, Any]]]:
    """Everything the operator renders for the samples and for the oracle policy."""
    specs = {p.stem: load_trustcluster(p).spec for p in sorted((K8S / "samples").glob("*.yaml"))}
    specs["oracle"] = TrustClusterSpec(backends=2, policy="oracle")
    specs["own-model"] = TrustClusterSpec(backends=1, balancer={"modelConfigMap": "trained"})
    out = []
    for name, spec in specs.items():
        objs = render.render_children(
            OWNER,
            spec,
            admin_token="a",
            control_token="c",
            xds_token="x" * 24,
            node_port=30080,
            model_ready=name == "own-model",
        )
        out += [(f"{name}:{o['kind']}/{o['metadata']['name']}", o) for o in objs]
    return out


ALL = manifest_docs() + rendered_objects()


@pytest.mark.parametrize("name,obj", ALL, ids=[n for n, _ in ALL])
def test_valid_for_kubernetes(name, obj):
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(n, o["spec"]["template"]["spec"]) for n, o in ALL if o["kind"] in WORKLOADS]


@pytest.mark.parametrize("name,pod", _pod_specs(), ids=[n for n, _ in _pod_specs()])
def test_every_pod_is_hardened(name, pod):
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True
    for c in pod["containers"] + pod.get("initContainers", []):
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert csc.get("privileged") is not True
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, c["name"]
        assert "livenessProbe" in c
    # Only volumes that Pod Security "restricted" allows.
    for v in pod.get("volumes", []):
        assert set(v) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}


def test_pods_that_do_not_talk_to_the_api_carry_no_token():
    for name, pod in _pod_specs():
        if ".yaml#" not in name:  # rendered by the operator: balancer and nodes
            # The balancer follows its backends' Services; with an Envoy data plane its
            # control plane does (Envoy, under the balancer's name, talks to no API).
            follows = "envoy:" in name and "Deployment/lab-xds" in name
            if follows or ("envoy:" not in name and "Deployment/lab-balancer" in name):
                assert pod["automountServiceAccountToken"] is True, name
                assert pod["serviceAccountName"] == "lab-balancer"
            else:
                assert pod["automountServiceAccountToken"] is False, name


def test_the_balancer_may_only_read_services_in_its_namespace():
    objs = {(o["kind"], o["metadata"]["name"]): o for _, o in rendered_objects()}
    role = objs[("Role", "lab-balancer")]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]}
    ]
    binding = objs[("RoleBinding", "lab-balancer")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "lab-balancer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lab-balancer", "namespace": OWNER.namespace}
    ]
    assert objs[("ServiceAccount", "lab-balancer")]["automountServiceAccountToken"] is False


def test_namespace_enforces_restricted_pod_security():
    ns = next(o for n, o in ALL if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _role(name: str) -> dict[str, Any]:
    return next(o for _, o in ALL if o["kind"] == "ClusterRole" and o["metadata"]["name"] == name)


def test_operator_rbac_is_exactly_what_it_uses():
    rules = _role("twlb-operator")["rules"]
    granted = {
        (group, res): set(r["verbs"])
        for r in rules
        for group in r["apiGroups"]
        for res in r["resources"]
    }
    assert all("*" not in verbs for verbs in granted.values())
    # Children: the kinds operator/kube.py handles, with the verbs it calls; Services also
    # `watch`, which the balancer's Role grants (one may grant only what one holds).
    groups = {
        "Deployment": "apps", "Service": "", "ConfigMap": "", "Secret": "",
        "ServiceAccount": "", "Role": "rbac.authorization.k8s.io",
        "RoleBinding": "rbac.authorization.k8s.io", "PodDisruptionBudget": "policy",
    }  # fmt: skip
    for kind in KINDS:
        plural = kind.lower() + "s"
        extra = {"watch"} if kind == "Service" else set()
        assert (
            granted[(groups[kind], plural)] == {"get", "list", "create", "patch", "delete"} | extra
        )
    balancer_rules = {
        (g, res): set(r["verbs"]) for r in render.BALANCER_RULES for g in r["apiGroups"]
        for res in r["resources"]
    }  # fmt: skip
    assert all(verbs <= granted[key] for key, verbs in balancer_rules.items())
    assert granted[("twlb.dev", "trustclusters")] == {"get", "list", "watch", "patch"}
    assert granted[("twlb.dev", "trustclusters/status")] == {"get", "patch"}
    assert granted[("", "events")] == {"create"}
    assert set(granted) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
        ("twlb.dev", "trustclusters"),
        ("twlb.dev", "trustclusters/status"),
        ("apps", "deployments"),
        ("", "services"),
        ("", "configmaps"),
        ("", "secrets"),
        ("", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("policy", "poddisruptionbudgets"),
        ("", "events"),
    }


def test_prometheus_may_only_read_what_it_discovers():
    rules = _role("twlb-prometheus")["rules"]
    assert rules == [
        {
            "apiGroups": [""],
            "resources": ["pods", "endpoints", "services"],
            "verbs": ["get", "list", "watch"],
        }
    ]


def test_operator_liveness_probe_is_kopfs_health_endpoint():
    dep = next(
        o for n, o in ALL if o["kind"] == "Deployment" and o["metadata"]["name"] == "twlb-operator"
    )
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "twlb-operator"


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabelling (keep and replace) of one target, as Prometheus does it."""
    labels = dict(labels)
    for r in rules:
        value = r.get("separator", ";").join(labels.get(s, "") for s in r["source_labels"])
        match = re.fullmatch(r.get("regex", "(.*)"), value)
        if r.get("action", "replace") == "keep":
            if not match:
                return None
        elif match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", r.get("replacement", "$1"))
            labels[r["target_label"]] = match.expand(replacement)
    return labels


def test_prometheus_scrapes_annotated_pods_on_their_metrics_port():
    cm = next(
        o
        for _, o in ALL
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "prometheus-config"
    )
    config = yaml.safe_load(cm["data"]["prometheus.yml"])
    scrape = config["scrape_configs"][0]
    assert scrape["kubernetes_sd_configs"] == [{"role": "pod"}]
    node = next(o for n, o in ALL if n.startswith("standard-mix:Deployment/lab-node-0"))
    pod = node["spec"]["template"]["metadata"]
    # What Prometheus' pod discovery reports for that pod.
    target = {
        "__address__": "10.244.0.7:8080",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "twlb",
        "__meta_kubernetes_pod_name": "lab-node-0-5d9c7",
        **{
            "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-z0-9]", "_", k): v
            for k, v in pod["annotations"].items()
        },
        **{
            "__meta_kubernetes_pod_label_" + re.sub(r"[^a-z0-9]", "_", k): v
            for k, v in pod["labels"].items()
        },
    }
    out = _relabel(scrape["relabel_configs"], target)
    assert out is not None
    assert out["__address__"] == "10.244.0.7:8080"
    assert out["__metrics_path__"] == "/metrics"
    assert (out["cluster"], out["node"], out["component"]) == ("lab", "lab-node-0", "backend")
    assert out["fault_type"] == pod["annotations"]["twlb.dev/fault-type"]
    unannotated = {k: v for k, v in target.items() if "prometheus_io_scrape" not in k}
    assert _relabel(scrape["relabel_configs"], unannotated) is None


def test_kind_maps_the_balancer_and_prometheus_node_ports_to_the_host():
    kind = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    mapped = {
        m["containerPort"]: m["hostPort"]
        for node in kind["nodes"]
        for m in node.get("extraPortMappings", [])
    }
    prometheus = next(
        o for _, o in ALL if o["kind"] == "Service" and o["metadata"]["name"] == "prometheus"
    )
    sample = yaml.safe_load((K8S / "samples" / "standard-mix.yaml").read_text())
    balancer_port = int(sample["metadata"]["annotations"][render.ANNOTATION_NODE_PORT])
    assert mapped[prometheus["spec"]["ports"][0]["nodePort"]] == 30090
    assert mapped[balancer_port] == 30080


def test_dockerfile_builds_one_non_root_image_running_twlb():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "FROM python:3.11-slim AS build" in lines
    assert f"USER {render.RUN_AS_UID}:{render.RUN_AS_UID}" in lines
    assert 'ENTRYPOINT ["twlb"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "reports" in ignored


def test_the_image_build_copies_every_folder_the_distribution_is_made_of():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = {
        line.split()[1].rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    assert folders <= copied, sorted(folders - copied)


def test_node_deployment_carries_its_fault_as_annotations_and_environment():
    spec = TrustClusterSpec(
        backends=2, nodes=[{"index": 1, "fault": {"type": "delay", "delayMs": 250}}]
    )
    objs = render.render_children(OWNER, spec, admin_token="a", control_token="c")
    dep = next(
        o for o in objs if o["metadata"]["name"] == "lab-node-1" and o["kind"] == "Deployment"
    )
    ann = dep["metadata"]["annotations"]
    assert ann["twlb.dev/fault-type"] == "delay"
    assert ann["twlb.dev/fault-probability"] == "1.0"
    assert ann["twlb.dev/fault-delay-ms"] == "250"
    assert ann["twlb.dev/fault-class"] == "delay"
    assert dep["spec"]["template"]["metadata"]["annotations"]["twlb.dev/fault-type"] == "delay"
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TWLB_BACKEND_FAULT_TYPE"]["value"] == "delay"
    assert env["TWLB_BACKEND_DELAY_MS"]["value"] == "250"
    assert env["TWLB_BACKEND_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "lab-tokens",
        "key": "control-token",
    }
    for o in objs:
        assert o["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
        assert o["metadata"]["labels"][render.LABEL_CLUSTER] == "lab"


def test_rendering_twice_plans_nothing_and_a_fault_change_plans_one_patch():
    spec = TrustClusterSpec(backends=4, seed=5)
    live = render.render_children(OWNER, spec, admin_token="a", control_token="c")
    assert plan(render.render_children(OWNER, spec, admin_token="x", control_token="y"), live).empty
    changed = spec.model_copy(update={"nodes": [{"index": 3, "fault": {"type": "error"}}]})
    changed = TrustClusterSpec.model_validate(changed.model_dump())
    todo = plan(render.render_children(OWNER, changed, admin_token="a", control_token="c"), live)
    assert todo.create == [] and todo.delete == []
    assert sorted(k for k, _ in todo.patch) == [
        ("ConfigMap", "lab-truth"),
        ("Deployment", "lab-node-3"),
    ]
