"""The TrustCluster CustomResourceDefinition, generated from the one spec model.

`render_crd()` turns the pydantic JSON schema of `TrustClusterSpec` into the structural
openAPIV3Schema Kubernetes wants ($refs inlined, `nullable` instead of `anyOf null`, no
`additionalProperties` next to `properties`), adds the CEL rules that the model checks in
Python, a declared status schema, the scale subresource (over `spec.backends`) and printer
columns. k8s/crd.yaml is its output.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from twlb.spec import API_GROUP, API_VERSION, KIND, PLURAL, TrustClusterSpec

SHORT_NAMES = ["tc"]
SINGULAR = "trustcluster"
CRD_NAME = f"{PLURAL}.{API_GROUP}"

#: CEL rules for the checks the model does in validators, keyed by the model's title.
#: Defaults are applied before CEL runs, so defaulted fields can be read directly.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "TrustClusterSpec": [
        {
            "rule": "self.faultMix.map(e, e.count).sum() <= self.backends",
            "message": "the faultMix counts must not add up to more than backends",
            "fieldPath": ".faultMix",
        },
        {
            "rule": "self.nodes.all(n, n.index < self.backends)",
            "message": "nodes[].index must be less than backends",
            "fieldPath": ".nodes",
        },
    ],
    "FaultSpec": [
        {
            "rule": "self.flapType != 'benign' && self.flapType != 'flapping'",
            "message": "flapType must be a fault other than benign or flapping",
            "fieldPath": ".flapType",
        }
    ],
}
CEL_RULES["FaultMixEntry"] = CEL_RULES["FaultSpec"]

#: Lists whose entries are identified by a key; the API server then rejects duplicates.
LIST_MAP_KEYS: dict[str, list[str]] = {"nodes": ["index"]}

_CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "description": "Ready or Degraded."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer"},
    },
}

_NODE_STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "The node's Deployment and Service."},
        "index": {"type": "integer"},
        "fault": {"type": "string", "description": "Fault type (ground truth)."},
        "class": {"type": "string", "description": "Ground-truth class of the node."},
        "ready": {"type": "boolean"},
        "url": {"type": "string", "description": "The backend URL the balancer uses."},
        "trust": {
            "type": "number",
            "nullable": True,
            "description": "The balancer's trust weight, 0..1.",
        },
        "state": {
            "type": "string",
            "nullable": True,
            "description": "The balancer's state for this backend.",
        },
        "suspected": {"type": "boolean", "description": "Trust below the threshold."},
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state, written by the operator.",
    # kopf keeps its own progress records under status; they must survive pruning.
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "phase": {
            "type": "string",
            "description": "Pending, Running, Degraded or Invalid.",
        },
        "observedGeneration": {"type": "integer", "nullable": True},
        "message": {"type": "string"},
        "backends": {"type": "integer", "description": "Backend nodes in the spec."},
        "readyBackends": {"type": "integer", "description": "Node Deployments ready."},
        "balancerReady": {"type": "boolean"},
        "selector": {
            "type": "string",
            "description": "Label selector of the backend pods (the scale subresource's).",
        },
        "faulty": {"type": "integer", "description": "Nodes carrying a fault (ground truth)."},
        "suspected": {
            "type": "integer",
            "nullable": True,
            "description": "Backends whose trust is below the threshold.",
        },
        "trustThreshold": {"type": "number"},
        "trustReadAt": {"type": "string", "format": "date-time", "nullable": True},
        "trustError": {"type": "string", "nullable": True},
        "balancerUrl": {"type": "string", "nullable": True},
        "conditions": {
            "type": "array",
            "items": _CONDITION_SCHEMA,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "nodes": {"type": "array", "items": _NODE_STATUS_SCHEMA},
        "trust": {
            "type": "array",
            "description": "The balancer's last /trust reading, one row per backend.",
            "items": {
                "type": "object",
                "properties": {
                    "url": {"type": "string"},
                    "node": {"type": "string", "nullable": True},
                    "weight": {"type": "number", "nullable": True},
                    "state": {"type": "string", "nullable": True},
                    "suspected": {"type": "boolean"},
                },
            },
        },
    },
}

#: `kubectl scale trustcluster NAME --replicas N` sets spec.backends; the scale's status
#: reports the ready backends and the selector of their pods (for autoscalers).
SCALE_SUBRESOURCE: dict[str, str] = {
    "specReplicasPath": ".spec.backends",
    "statusReplicasPath": ".status.readyBackends",
    "labelSelectorPath": ".status.selector",
}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Policy", "type": "string", "jsonPath": ".spec.policy"},
    {
        "name": "DataPlane",
        "type": "string",
        "jsonPath": ".spec.dataPlane",
        "description": "What routes the traffic: balancer (TW-LB's proxy) or envoy.",
    },
    {"name": "Backends", "type": "integer", "jsonPath": ".spec.backends"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyBackends"},
    {
        "name": "Faulty",
        "type": "integer",
        "jsonPath": ".status.faulty",
        "description": "Nodes carrying a fault (ground truth from the spec).",
    },
    {
        "name": "Suspected",
        "type": "integer",
        "jsonPath": ".status.suspected",
        "description": "Backends the balancer trusts less than the threshold.",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: Any, defs: dict[str, Any], name: str | None = None) -> Any:
    """One pydantic JSON-schema node as a structural OpenAPI v3 schema node."""
    if not isinstance(node, dict):
        return node
    node = dict(node)
    title = None
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        title = ref
        # Siblings of a $ref (default, description) win over the referenced schema's.
        node = {**copy.deepcopy(defs[ref]), **node}
    title = title or node.get("title")
    node.pop("title", None)
    out: dict[str, Any] = {}
    variants = node.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf {variants} structurally")
        merged = {**_structural(non_null[0], defs), "nullable": True}
        if node.get("default", 0) is None:
            node.pop("default")
        node = {**merged, **node}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _structural(v, defs, k) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties" and value is False:
            # Structural schemas prune unknown fields; strict field validation rejects them.
            continue
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        elif key == "maxLength" and node.get("type") == "array":
            out["maxItems"] = value
        elif key == "minLength" and node.get("type") == "array":
            out["minItems"] = value
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" in out:
        # An object with defaults inside gets `{}` so the server fills those defaults in.
        if name is not None and "default" not in out:
            out["default"] = {}
        if title in CEL_RULES:
            out["x-kubernetes-validations"] = copy.deepcopy(CEL_RULES[title])
    if out.get("type") == "array" and name in LIST_MAP_KEYS:
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = LIST_MAP_KEYS[name]
    if out.get("type") == "array" and name is not None and "default" not in out:
        out["default"] = []
    return out


def spec_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of `.spec`, derived from TrustClusterSpec."""
    raw = TrustClusterSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def render_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition for TrustCluster as a dict."""
    spec = spec_schema()
    spec["default"] = {}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "twlb",
                "app.kubernetes.io/part-of": "twlb",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": SHORT_NAMES,
                "categories": ["twlb"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, "scale": dict(SCALE_SUBRESOURCE)},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A trust-weighted load balancer over fault-annotated "
                            "backend nodes.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """k8s/crd.yaml's exact text."""
    header = "# Generated by `twlb crd` (make crd) from twlb/spec.py; do not edit by hand.\n"
    return header + yaml.safe_dump(render_crd(), sort_keys=False, width=100)
