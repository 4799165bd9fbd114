"""The TrustCluster CRD: generated from the one spec model, structural, and in the repo as is."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from twlb.operator.crd import (
    CRD_NAME,
    PRINTER_COLUMNS,
    SCALE_SUBRESOURCE,
    render_crd,
    render_crd_yaml,
)

from twlb.cli import main
from twlb.spec import (
    FLAP_PERIOD_MIN_S,
    FaultType,
    PolicyName,
    SpecError,
    TrustClusterSpec,
    load_trustcluster,
    parse_trustcluster,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.31"


def openapi_schema() -> dict[str, Any]:
    return render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def as_strict_jsonschema(node: Any) -> Any:
    """The CRD schema as jsonschema sees the API server's strict field validation.

    OpenAPI's `nullable` becomes a null type and, as `kubectl apply` (strict field
    validation) does, unknown fields are rejected. CEL rules are left to the server.
    """
    if isinstance(node, list):
        return [as_strict_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_strict_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        out.pop("nullable")
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    return out


@functools.cache
def strict_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(as_strict_jsonschema(openapi_schema()))


def test_checked_in_crd_is_what_the_model_generates():
    assert (K8S / "crd.yaml").read_text() == render_crd_yaml(), (
        "k8s/crd.yaml drifted from twlb/spec.py: run `make crd`"
    )


def test_twlb_crd_prints_the_crd():
    result = CliRunner().invoke(main, ["crd"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == render_crd()


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(render_crd(), KUBERNETES_VERSION, strict=True)
    crd = render_crd()
    assert crd["metadata"]["name"] == CRD_NAME == "trustclusters.twlb.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "TrustCluster",
        "trustclusters",
        ["tc"],
    )
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}, "scale": SCALE_SUBRESOURCE}
    assert [c["name"] for c in PRINTER_COLUMNS] == [
        "Policy",
        "DataPlane",
        "Backends",
        "Ready",
        "Faulty",
        "Suspected",
        "Phase",
        "Age",
    ]


def _walk(node: Any, path: str = "$"):
    if isinstance(node, dict):
        yield path, node
        for key in ("properties",):
            for name, child in node.get(key, {}).items():
                yield from _walk(child, f"{path}.{name}")
        if "items" in node:
            yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural():
    """Kubernetes' structural-schema rules: a type everywhere, no refs, no anyOf with types."""
    for path, node in _walk(openapi_schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for banned in ("$ref", "$defs", "anyOf", "oneOf", "title", "additionalProperties"):
            assert banned not in node, f"{path} has {banned}"
        if "default" in node and node["type"] == "object":
            assert node["default"] == {}, path


def test_schema_carries_the_models_enums_bounds_and_defaults():
    spec = openapi_schema()["properties"]["spec"]
    props = spec["properties"]
    assert props["policy"]["enum"] == [p.value for p in PolicyName]
    assert props["policy"]["default"] == "trust"
    assert (props["backends"]["minimum"], props["backends"]["maximum"]) == (1, 100)
    fault = props["faultMix"]["items"]["properties"]
    assert fault["type"]["enum"] == [f.value for f in FaultType]
    assert (fault["probability"]["minimum"], fault["probability"]["maximum"]) == (0.0, 1.0)
    assert (
        fault["periodS"]["minimum"] == FLAP_PERIOD_MIN_S
        and "exclusiveMinimum" not in fault["periodS"]
    )
    assert props["nodes"]["x-kubernetes-list-map-keys"] == ["index"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "self.faultMix.map(e, e.count).sum() <= self.backends" in rules
    # The defaults the API server fills in are the model's defaults.
    defaults = TrustClusterSpec().model_dump(by_alias=True, mode="json")
    for name, prop in props.items():
        if "default" in prop and prop["type"] != "object":
            assert prop["default"] == defaults[name], name
    balancer = props["balancer"]["properties"]
    for name, prop in balancer.items():
        if "default" in prop:
            assert prop["default"] == defaults["balancer"][name], name


def _samples() -> list[Path]:
    return sorted((K8S / "samples").glob("*.yaml"))


@pytest.mark.parametrize("path", _samples(), ids=lambda p: p.name)
def test_samples_pass_the_crd_schema_and_the_model(path):
    doc = yaml.safe_load(path.read_text())
    errors = [e.message for e in strict_validator().iter_errors(doc)]
    assert errors == []
    load_trustcluster(path)


def test_the_invalid_sample_is_rejected_by_the_crd_schema():
    path = K8S / "samples" / "invalid" / "bad-fault.yaml"
    doc = yaml.safe_load(path.read_text())
    errors = {
        ".".join(map(str, e.absolute_path)) or "$": e for e in strict_validator().iter_errors(doc)
    }
    assert set(errors) == {"spec", "spec.policy", "spec.faultMix.0.probability"}
    assert "'replicas' was unexpected" in errors["spec"].message
    with pytest.raises(SpecError):
        load_trustcluster(path)


def test_samples_exist_for_a_benign_cluster_and_the_standard_mix():
    names = {p.stem for p in _samples()}
    assert {"benign", "standard-mix"} <= names
    mix = load_trustcluster(K8S / "samples" / "standard-mix.yaml").spec
    assert mix.backends == 6
    assert sorted((e.type.value, e.count) for e in mix.fault_mix) == [
        ("byzantine", 1),
        ("delay", 1),
        ("error", 1),
    ]


# Specs drawn from values on both sides of every bound, so both answers happen.
_fault = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([*(f.value for f in FaultType), "slow"]),
        "probability": st.floats(-0.5, 1.5, allow_nan=False),
        "delayMs": st.integers(-10, 700_000),
        "errorStatus": st.integers(400, 650),
        "periodS": st.floats(-1, 4000, allow_nan=False),
        "count": st.integers(-1, 3),
    },
)
_spec = st.fixed_dictionaries(
    {},
    optional={
        "backends": st.integers(-1, 120),
        "seed": st.integers(-1, 10),
        "policy": st.sampled_from([*(p.value for p in PolicyName), "fastest"]),
        "faultMix": st.lists(_fault, max_size=3),
        "balancer": st.fixed_dictionaries(
            {}, optional={"auditFraction": st.floats(-0.1, 1.1, allow_nan=False)}
        ),
        "image": st.sampled_from(["", "twlb:0.1.0"]),
        "extra": st.just(1),
    },
)


@settings(max_examples=150, deadline=None)
@given(_spec)
def test_the_schema_is_never_stricter_than_the_model(spec):
    """Where the schema rejects, the model does too; what the model takes, the schema takes.

    The model also rejects what only CEL rules catch (e.g. faultMix over backends),
    which the API server checks and jsonschema cannot.
    """
    doc = {
        "apiVersion": "twlb.dev/v1alpha1",
        "kind": "TrustCluster",
        "metadata": {"name": "t"},
        "spec": copy.deepcopy(spec),
    }
    schema_ok = strict_validator().is_valid(doc)
    try:
        parse_trustcluster(doc)
        model_ok = True
    except SpecError:
        model_ok = False
    assert not (model_ok and not schema_ok)
