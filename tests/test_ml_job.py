"""The in-cluster training Job and the ConfigMap it publishes fit what the operator renders."""

from __future__ import annotations

import base64
from pathlib import Path

import kubernetes_validate
import yaml
from twlb.ml.publish import render_configmap
from twlb.operator import render

from twlb.spec import TrustClusterSpec

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "k8s" / "jobs" / "ml-train-job.yaml"
SHIPPED = ROOT / "ml" / "models"
LAB = render.Owner(name="lab", namespace="twlb", uid="0f4c2b64-3c2e-4d4e-9a55-1f1b5d0c2a77")


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(JOB.read_text()) if d}


def _args(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"][1:])


def test_published_configmap_holds_the_model_under_the_key_the_balancer_mounts() -> None:
    cm = render_configmap("lab-model", "twlb", SHIPPED)
    kubernetes_validate.validate(cm, "1.31", strict=True)
    model = base64.b64decode(cm["binaryData"][render.MOUNTED_MODEL_FILE])
    assert model == (SHIPPED / "trust-svm.onnx").read_bytes()
    assert "MODEL_CARD.md" in cm["data"] and "training_report.json" in cm["data"]
    assert len(yaml.safe_dump(cm)) < 1_000_000  # a ConfigMap holds at most 1 MiB


def test_job_reads_the_clusters_truth_and_patches_only_the_model_configmap_it_mounts() -> None:
    docs = _docs()
    pod = docs["Job"]["spec"]["template"]["spec"]
    collect = _args(pod["initContainers"][0])
    train = _args(pod["containers"][0])
    assert pod["initContainers"][0]["args"][0] == "collect"
    assert pod["containers"][0]["args"][0] == "train"
    # The model ConfigMap the operator mounts into the lab's balancer is the one trained into.
    name = render.model_config_map_name(LAB, TrustClusterSpec())
    assert train["publish-configmap"] == name and train["namespace"] == LAB.namespace
    assert collect["out"] == train["data"]
    env = pod["initContainers"][0]["env"][0]
    assert env["name"] == "TWLB_COLLECT_CONTROL_TOKEN"
    secret = env["valueFrom"]["secretKeyRef"]
    assert secret == {"name": render.tokens_secret_name(LAB), "key": render.TOKENS_CONTROL_KEY}
    assert collect["selector"] == f'cluster="{LAB.name}"'
    # Least privilege: get and patch on that one name, create (not nameable) and nothing else.
    rules = docs["Role"]["rules"]
    assert {"resources": ["configmaps"], "resourceNames": [name], "verbs": ["get", "patch"]} == {
        k: rules[0][k] for k in ("resources", "resourceNames", "verbs")
    }
    assert rules[1]["verbs"] == ["create"] and "resourceNames" not in rules[1]
    assert docs["RoleBinding"]["subjects"][0]["name"] == pod["serviceAccountName"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
