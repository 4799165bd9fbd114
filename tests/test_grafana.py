"""Grafana and the alerts read real facts: the provisioned dashboard is well formed and every
metric name it and the alerting rules query exists in the /metrics of a running cluster."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twlb.balancer.settings import resolve_model
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.processes.managed import free_port_range

from twlb.spec import load_trustcluster

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "k8s" / "grafana.yaml"
#: A metric name in PromQL: what the balancer and the nodes export all start with twlb_.
METRIC = re.compile(r"\btwlb_[a-z0-9_]+")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _configmap(path: Path, name: str) -> dict[str, str]:
    return next(
        d for d in _docs(path) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
    )["data"]


def dashboard() -> dict:
    return json.loads(_configmap(GRAFANA, "grafana-dashboard-twlb")["twlb.json"])


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def rule_queries() -> list[str]:
    rules = yaml.safe_load(
        _configmap(ROOT / "k8s" / "prometheus.yaml", "prometheus-config")["twlb-alerts.yml"]
    )
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def exported_names(text: str) -> set[str]:
    """Every series name an exposition offers, including declared families with no sample
    yet (a counter no backend has incremented still exists, as Prometheus would see it)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + sfx for sfx in suffixes.get(family.type, ("",)))
    return names


def test_grafana_is_provisioned_with_prometheus_and_the_twlb_dashboard():
    provisioning = _configmap(GRAFANA, "grafana-provisioning")
    ds = yaml.safe_load(provisioning["datasources.yaml"])["datasources"]
    assert [(d["type"], d["uid"], d["url"]) for d in ds] == [
        ("prometheus", "prometheus", "http://prometheus.twlb.svc:9090")
    ]
    providers = yaml.safe_load(provisioning["dashboards.yaml"])["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana-dashboards"
    assert providers[0]["allowUiUpdates"] is False
    dash = dashboard()
    assert dash["uid"] == "twlb"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "prometheus"
        assert all(t["datasource"]["uid"] == "prometheus" for t in p["targets"])
    queried = " ".join(dashboard_queries())
    for what in (
        "twlb_balancer_trust",
        "twlb_balancer_ejections_total",
        "twlb_balancer_audit_mismatches_total",
        "twlb_balancer_upstream_requests_total",
        "twlb_balancer_upstream_duration_seconds_bucket",
        "twlb_node_cpu_utilization_ratio",
    ):
        assert what in queried, what


def test_grafana_mounts_what_it_is_provisioned_with():
    dep = next(d for d in _docs(GRAFANA) if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert mounts["/var/lib/grafana-dashboards"]["readOnly"] is True
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(
        "/var/lib/grafana-dashboards/"
    )
    prov = env["GF_PATHS_PROVISIONING"]
    assert f"{prov}/datasources/datasources.yaml" in mounts
    assert f"{prov}/dashboards/dashboards.yaml" in mounts
    # A read-only root: Grafana writes only to its data and /tmp volumes.
    assert {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")} == {
        "/var/lib/grafana",
        "/tmp",
    }


@pytest.fixture(scope="module")
def expositions(tmp_path_factory) -> str:
    """The balancer's and one node's /metrics from a running three-node cluster under load."""
    tc = load_trustcluster(ROOT / "k8s" / "samples" / "benign.yaml")  # three nodes
    state = tmp_path_factory.mktemp("names")
    model = resolve_model("shipped")
    assert model is not None, "the shipped trust model (its reload counters) is missing"
    cluster = EmbeddedCluster(
        tc, port_base=free_port_range(5), state_dir=state, prometheus=False, model=model
    )
    with cluster, httpx.Client(timeout=5.0) as client:
        for i in range(20):  # some traffic, so per-backend series exist
            client.get(cluster.balancer_url + "/work", params={"key": f"k{i}"})
        return (
            client.get(cluster.admin_url + "/metrics").text
            + client.get(cluster.nodes[0].url + "/metrics").text
        )


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_name_queried_exists_in_a_running_cluster(source: str, expositions: str):
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    wanted = {name for q in queries for name in METRIC.findall(q)}
    assert wanted, "no metric names found in the queries"
    missing = wanted - exported_names(expositions)
    assert not missing, f"{source} queries metrics no process exports: {sorted(missing)}"
