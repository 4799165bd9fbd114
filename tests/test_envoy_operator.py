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
    DEPLOYMENTS,
    FAST_OPERATOR,
    SECRETS,
    SERVICES,
    TRUSTCLUSTERS,
    running_operator,
    trustcluster,
    wait_for,
)
from twlb.envoy.process import SEARCH_PATH_ENV, envoy_binary
from twlb.envoy.resources import XDS_TOKEN_HEADER
from twlb.operator.crd import PRINTER_COLUMNS
from twlb.operator.render import (
    ENVOY_BOOTSTRAP_FILE,
    ENVOY_MODULES_DIR,
    ENVOY_STATS_PORT,
    TOKENS_ADMIN_KEY,
    TOKENS_XDS_KEY,
    XDS_PORT,
    Owner,
    render_children,
    render_tokens_secret,
    secret_values,
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
        # It loads TW-LB's answer sampler from where the image's build put it.
        assert container["env"] == [{"name": SEARCH_PATH_ENV, "value": ENVOY_MODULES_DIR}]
        dockerfile = (Path(__file__).parents[1] / "Dockerfile").read_text()
        assert f"build_sampler(Path('{ENVOY_MODULES_DIR}'))" in dockerfile
        assert pod["automountServiceAccountToken"] is False
        annotations = envoy["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ENVOY_STATS_PORT)
        assert annotations["prometheus.io/path"] == "/stats/prometheus"
        # Its bootstrap (a Secret: it holds the xDS token) points at the control plane's
        # Service and shows it the token kept in the cluster's tokens Secret.
        boot = json.loads(
            secret_values(cluster.get(SECRETS, NS, "edge-envoy"))[ENVOY_BOOTSTRAP_FILE]
        )
        token = secret_values(cluster.get(SECRETS, NS, "edge-tokens"))[TOKENS_XDS_KEY]
        ads = boot["dynamicResources"]["adsConfig"]["grpcServices"][0]
        assert ads["initialMetadata"] == [{"key": XDS_TOKEN_HEADER, "value": token}]
        assert {"name": "envoy-config", "secret": {"secretName": "edge-envoy"}} in pod["volumes"]
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
        env = {e["name"]: e for e in plane["containers"][0]["env"]}
        assert env["TWLB_ENVOY_XDS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "edge-tokens",
            "key": TOKENS_XDS_KEY,
        }
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
        owner, TrustClusterSpec.model_validate(SPEC), admin_token="a", control_token="c",
        xds_token="t" * 32,
    )  # fmt: skip
    config = next(
        o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "edge-envoy"
    )
    path = tmp_path / "bootstrap.json"
    text = secret_values(config)[ENVOY_BOOTSTRAP_FILE]
    # The Service name resolves only in the cluster: validated with a loopback address.
    path.write_text(text.replace(f"edge-xds.{NS}.svc", "127.0.0.1"))
    out = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


async def test_a_cluster_from_before_the_xds_token_gets_one_and_keeps_its_tokens(cluster):
    owner = Owner("old", NS, "uid-old")
    await cluster.create(TRUSTCLUSTERS, trustcluster("old", NS, SPEC, uid=owner.uid))
    # Its tokens Secret as an operator without the xDS token wrote it.
    await cluster.create(SECRETS, render_tokens_secret(owner, "admin-" * 4, "control-" * 3))
    async with running_operator([NS], FAST_OPERATOR):
        await wait_for(lambda: cluster.get(SECRETS, NS, "old-envoy") is not None, timeout=10)

        def tokens() -> dict[str, str]:
            return secret_values(cluster.get(SECRETS, NS, "old-tokens"))

        await wait_for(lambda: TOKENS_XDS_KEY in tokens(), timeout=10)
        kept = tokens()
        assert kept[TOKENS_ADMIN_KEY] == "admin-" * 4 and kept["control-token"] == "control-" * 3
        boot = json.loads(
            secret_values(cluster.get(SECRETS, NS, "old-envoy"))[ENVOY_BOOTSTRAP_FILE]
        )
        [meta] = boot["dynamicResources"]["adsConfig"]["grpcServices"][0]["initialMetadata"]
        assert meta["value"] == kept[TOKENS_XDS_KEY]
