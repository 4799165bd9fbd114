"""The Prometheus alerting rules in k8s/prometheus.yaml: `promtool check rules` accepts them
and `promtool test rules` proves each alert fires when it should and not before
(tests/promtool/twlb-alerts.test.yml). promtool ships in Debian's `prometheus` package;
missing, these tests fail."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT_TESTS = ROOT / "tests" / "promtool" / "twlb-alerts.test.yml"
ALERTS = {
    "TWLBBackendEjected",
    "TWLBAuditsFoundWrongAnswers",
    "TWLBNoBackendTrusted",
    "TWLBModelLoadFailures",
    "TWLBBalancerDown",
}


def prometheus_config() -> dict[str, str]:
    docs = yaml.safe_load_all((ROOT / "k8s" / "prometheus.yaml").read_text())
    cm = next(d for d in docs if d and d["kind"] == "ConfigMap")
    return cm["data"]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(prometheus_config()["twlb-alerts.yml"])["groups"]
    return [r for g in groups for r in g["rules"]]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_prometheus_loads_the_rules_file_the_configmap_carries():
    config = yaml.safe_load(prometheus_config()["prometheus.yml"])
    assert config["rule_files"] == ["/etc/prometheus/twlb-alerts.yml"]
    # The ConfigMap is mounted whole at /etc/prometheus, so the key is that file.
    assert "twlb-alerts.yml" in prometheus_config()


def test_every_alert_exists_and_has_a_unit_test():
    assert {r["alert"] for r in alert_rules()} == ALERTS
    tested = {
        t["alertname"]
        for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert tested == ALERTS


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path):
    (tmp_path / "twlb-alerts.yml").write_text(prometheus_config()["twlb-alerts.yml"])
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    check = _promtool("check", "rules", "twlb-alerts.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout
    test = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path):
    """A rule that no longer fires makes `promtool test rules` fail (the tests bite)."""
    broken = prometheus_config()["twlb-alerts.yml"].replace(
        "increase(twlb_balancer_ejections_total[5m]) > 0",
        "increase(twlb_balancer_ejections_total[5m]) > 100",
    )
    (tmp_path / "twlb-alerts.yml").write_text(broken)
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    test = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert test.returncode != 0
    assert "TWLBBackendEjected" in test.stdout + test.stderr
