"""`dataPlane: envoy` on Kubernetes: the real kopf operator against kmock's API emulator
renders Envoy (its Deployment under the balancer's name, its bootstrap in a ConfigMap
pointing at the control plane's Service) and TW-LB as the control plane; `kubectl get
trustclusters` shows the data plane; Envoy's metrics are scraped beside TW-LB's. The
bootstrap the operator renders passes `envoy --mode validate`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from kube_harness import (
    CONFIGMAPS,
    DEPLOYMENTS,
    FAST_OPERATOR,
    SERVICES,
    TRUSTCLUSTERS,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.envoy.process import envoy_binary
from twlb.operator.crd import PRINTER_COLUMNS
from twlb.operator.render import (
    ENVOY_BOOTSTRAP_FILE,
    ENVOY_STATS_PORT,
    XDS_PORT,
    Owner,
    render_children,
)

from twlb.spec import TrustClusterSpec

NS = "lab"
SPEC = {"backends": 3, "seed": 3, "policy": "trust", "dataPlane": "envoy"}

pytestmark = pytest.mark.timeout(60)


async def test_the_operator_renders_envoy_and_its_control_plane(cluster):
    async with running_operator([NS], FAST_OPERATOR):
        await cluster.create(TRUSTCLUSTERS, trustcluster("edge", NS, SPEC))

        def rendered() -> bool:
            return cluster.get(DEPLOYMENTS, NS, "edge-balancer") is not None and (
                cluster.get(DEPLOYMENTS, NS, "edge-xds") is not None
            )

        await wait_for(rendered, timeout=10)
        # Envoy, under the balancer's name: the NodePort Service and the status find it.
        envoy = cluster.get(DEPLOYMENTS, NS, "edge-balancer")
        pod = envoy["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["command"] == ["envoy"]
        assert container["args"][:2] == ["-c", f"/etc/envoy/{ENVOY_BOOTSTRAP_FILE}"]
        assert pod["automountServiceAccountToken"] is False
        annotations = envoy["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ENVOY_STATS_PORT)
        assert annotations["prometheus.io/path"] == "/stats/prometheus"
        # Its bootstrap points at the control plane's Service.
        config = cluster.get(CONFIGMAPS, NS, "edge-envoy")
        boot = json.loads(config["data"][ENVOY_BOOTSTRAP_FILE])
        clusters = {c["name"]: c for c in boot["staticResources"]["clusters"]}
        xds = clusters["twlb_control_plane"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]
        address = xds["endpoint"]["address"]["socketAddress"]
        assert address == {"address": f"edge-xds.{NS}.svc", "portValue": XDS_PORT}
        assert clusters["twlb_control_plane"]["type"] == "STRICT_DNS"
        # The control plane: the balancer's settings and discovery, serving Envoy.
        plane = cluster.get(DEPLOYMENTS, NS, "edge-xds")["spec"]["template"]["spec"]
        args = plane["containers"][0]["args"]
        assert args[:2] == ["envoy", "--no-envoy"]
        assert "--discover-services" in args and "--evidence-file" in args
        assert plane["serviceAccountName"] == "edge-balancer"
        ports = {
            p["name"]: p["port"] for p in cluster.get(SERVICES, NS, "edge-xds")["spec"]["ports"]
        }
        assert ports["xds"] == XDS_PORT
        traffic = cluster.get(SERVICES, NS, "edge-balancer")["spec"]
        assert traffic["type"] == "NodePort"
        assert traffic["selector"]["app.kubernetes.io/component"] == "balancer"
        # `kubectl get trustclusters` shows the data plane (the CRD's printer column).
        column = next(c for c in PRINTER_COLUMNS if c["name"] == "DataPlane")
        assert column["jsonPath"] == ".spec.dataPlane"
        tc = cluster.get(TRUSTCLUSTERS, NS, "edge")
        assert tc["spec"]["dataPlane"] == "envoy"


def test_the_rendered_bootstrap_passes_envoys_own_validation(tmp_path: Path) -> None:
    owner = Owner("edge", NS, "uid-1")
    objs = render_children(
        owner, TrustClusterSpec.model_validate(SPEC), admin_token="a", control_token="c"
    )
    config = next(
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "edge-envoy"
    )
    path = tmp_path / "bootstrap.json"
    text = config["data"][ENVOY_BOOTSTRAP_FILE]
    # The Service name resolves only in the cluster: validated with a loopback address.
    path.write_text(text.replace(f"edge-xds.{NS}.svc", "127.0.0.1"))
    out = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
