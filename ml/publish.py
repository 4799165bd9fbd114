"""Publish a trained model as the ConfigMap the balancer mounts (kubernetes client).

The ONNX file travels as binaryData under the key the operator mounts into the balancer,
the model card and training report as data. The
ConfigMap is patched when it exists and created otherwise, so the Job's ServiceAccount
needs only get, create and patch on that one name.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twlb.balancer.settings import TRAINED_MODEL_FILE
from twlb.ml.train import CARD_FILE, REPORT_FILE
from twlb.operator.render import MOUNTED_MODEL_FILE


def render_configmap(name: str, namespace: str, model_dir: Path) -> dict[str, Any]:
    """The ConfigMap holding a model directory's model, card and report (pure)."""
    model = model_dir / TRAINED_MODEL_FILE
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no model to publish")
    data = {
        f: (model_dir / f).read_text()
        for f in (CARD_FILE, REPORT_FILE)
        if (model_dir / f).is_file()
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "twlb", "app.kubernetes.io/component": "model"},
        },
        # The key the operator mounts into the balancer (its --model path).
        "binaryData": {MOUNTED_MODEL_FILE: base64.b64encode(model.read_bytes()).decode()},
        "data": data,
    }


def publish_model(
    name: str, namespace: str, model_dir: Path, log: Callable[[str], None] = print
) -> None:
    """Patch or create the ConfigMap from inside a cluster (or with a local kubeconfig)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CoreV1Api()
    body = render_configmap(name, namespace, model_dir)
    try:
        api.read_namespaced_config_map(name, namespace)
    except ApiException as err:
        if err.status != 404:
            raise
        api.create_namespaced_config_map(namespace, body)
        log(f"created ConfigMap {namespace}/{name}")
        return
    api.patch_namespaced_config_map(name, namespace, body)
    log(f"patched ConfigMap {namespace}/{name}")
