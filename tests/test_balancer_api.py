"""The balancer's own interfaces on loopback: start-up errors, 413, 503, admin API, /trust.

Services are shared per module and started in parallel (`ServiceGroup`), since starting
a Python service is most of what these tests cost.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from twlb.balancer.metrics import EXPOSITION_MAX_AGE_S
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

from twlb.cli import main
from twlb.work import digest

TOKEN = "s3cret-admin"


@dataclass
class ServiceGroup:
    """`twlb` services started together for a module, each stopped by its own pid."""

    log_dir: Path
    procs: list[ManagedProcess] = field(default_factory=list)
    pending: list[tuple[ManagedProcess, str]] = field(default_factory=list)

    def start(self, service: str, *args: str, port: int | None = None) -> str:
        """Start `twlb service` on a free loopback port (not waited for); returns its URL."""
        port = port or free_port()
        proc = ManagedProcess(
            twlb_argv(service, "--host", "127.0.0.1", "--port", str(port), *args),
            log_path=self.log_dir / f"{service}-{port}.log",
        ).start()
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.pending.append((proc, url))
        return url

    def wait(self, timeout: float = 60.0) -> None:
        """Wait until every service started since the last wait answers /healthz."""
        for proc, url in self.pending:
            proc.wait_ready(url + "/healthz", timeout=timeout)
        self.pending.clear()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        for proc in self.procs:
            assert not pid_alive(proc.pid), f"process {proc.pid} outlived its tests"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceGroup]:
    g = ServiceGroup(tmp_path_factory.mktemp("services"))
    yield g
    g.stop()


@dataclass
class Site:
    first: str  # benign backends, node ids "first" and "second"
    second: str
    balancer: str  # in front of `first`: admin token, 100-byte body limit, trust policy
    bare: str  # no backends, no admin token
    dead: str  # in front of a port where nothing listens
    hashing: str  # consistent-hash in front of both backends


@pytest.fixture(scope="module")
def site(group: ServiceGroup) -> Site:
    quiet = ("--log-level", "warning")
    first = group.start("backend", "--no-simulation", "--node-id", "first", *quiet)
    second = group.start("backend", "--no-simulation", "--node-id", "second", *quiet)
    balancer = group.start(
        "balancer", "--backend", first, "--admin-token", TOKEN, "--max-body-bytes", "100",
        "--policy", "trust", "--window", "2", "--health-interval", "0.2", "--backend-header",
        *quiet,
        # the routing shares these tests expect are the documented heuristic's
        "--model", "heuristic",
    )  # fmt: skip
    bare = group.start("balancer", *quiet)
    dead = group.start(
        "balancer", "--backend", f"http://127.0.0.1:{free_port()}",
        "--health-interval", "0.1", "--health-timeout", "0.1", *quiet,
    )  # fmt: skip
    hashing = group.start(
        "balancer", "--backend", first, "--backend", second, "--policy", "consistent-hash",
        "--audit-fraction", "0", *quiet,
    )  # fmt: skip
    group.wait()
    return Site(first, second, balancer, bare, dead, hashing)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fastest-guess"], "'fastest-guess' is not one of"),
        (["--backend", "ftp://127.0.0.1:9"], "must start with http://"),
        (["--backend", "http://127.0.0.1:99999"], "malformed backend URL"),
        (["--backend", "http://127.0.0.1:9/some/path"], "must be an origin"),
        (["--policy", "oracle"], "--policy oracle needs --oracle-truth"),
        (["--model", "/nonexistent/model.onnx"], "does not exist"),
    ],
)
def test_bad_start_up_input_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["balancer", "--port", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_model_file_that_is_not_a_model_stops_start_up(tmp_path: Path) -> None:
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not an onnx graph")
    result = CliRunner().invoke(main, ["balancer", "--port", "1", "--model", str(junk)])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --model" in result.output
    assert str(junk) in result.output


def test_backend_urls_from_the_environment_are_space_separated() -> None:
    env = {"TWLB_BALANCER_BACKEND": "http://127.0.0.1:1 nonsense://x"}
    result = CliRunner().invoke(main, ["balancer", "--port", "1"], env=env)
    assert result.exit_code == 2
    assert "nonsense://x" in result.output


def test_the_installed_command_exits_2_on_an_unknown_policy() -> None:
    argv = twlb_argv("balancer", "--port", str(free_port()), "--policy", "nope")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Invalid value for '--policy'" in done.stderr


def test_no_backend_up_gives_503_with_a_json_reason(site: Site) -> None:
    # One failed check takes a never-seen backend out; until then tries fail with 502.
    with httpx.Client(base_url=site.dead, timeout=5) as client:
        deadline = time.monotonic() + 10
        while (r := client.get("/work?key=a")).status_code != 503:
            assert r.status_code == 502, r.text
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json() == {"error": "no backend is up"}
        assert client.get("/healthz").json()["backends_up"] == 0

    r = httpx.get(site.bare + "/anything", timeout=5)
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "no backends configured"}


def test_bodies_over_the_limit_get_413_and_smaller_ones_pass(site: Site) -> None:
    with httpx.Client(base_url=site.balancer, timeout=5) as client:
        r = client.post("/work?key=a", content=b"x" * 101)
        assert r.status_code == 413
        assert r.json() == {"error": "request body over the limit of 100 bytes"}

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
            for _ in range(5):
                yield b"y" * 30

        assert client.put("/work?key=a", content=chunks()).status_code == 413

        r = client.request("GET", "/work", params={"key": "fits"}, content=b"z" * 100)
        assert r.status_code == 200
        assert r.json()["digest"] == digest("fits")
        assert r.headers["x-twlb-backend"] == site.first


def test_proxy_forwards_path_and_query_and_passes_backend_answers_through(site: Site) -> None:
    with httpx.Client(base_url=site.balancer, timeout=5) as client:
        before = _sample(client, "twlb_balancer_requests_total", 'outcome="success"')
        r = client.get("/work", params={"key": "k e y", "rounds": "3"})
        assert r.status_code == 200
        assert r.json()["digest"] == digest("k e y", 3)
        assert r.json()["rounds"] == 3
        # The backend's own 4xx comes through unchanged and counts as the caller's fault.
        assert client.get("/work", params={"rounds": "0"}).status_code == 422
        assert client.head("/not-a-balancer-path").status_code == 404
        # A HEAD answer has no body but keeps the length the backend declared; the
        # backend's own headers (here Allow) come through.
        get = client.post("/work", params={"key": "h"})
        head = client.head("/work", params={"key": "h"})
        assert (get.status_code, head.status_code) == (405, 405)
        assert head.headers["allow"] == "GET"
        assert head.headers["content-length"] == str(len(get.content))
        assert head.content == b""
        after = _sample(client, "twlb_balancer_requests_total", 'outcome="success"')
        assert after - before == 5


def _sample(client: httpx.Client, name: str, labels: str) -> float:
    """One sample's value from the balancer's /metrics (0 if absent), read once any
    rendering made before the call has aged out (metrics.py reuses one for at most
    EXPOSITION_MAX_AGE_S)."""
    time.sleep(EXPOSITION_MAX_AGE_S + 0.05)
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_admin_api_needs_a_configured_token(site: Site) -> None:
    r = httpx.get(site.bare + "/admin/backends", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403
    assert r.json() == {"error": "admin disabled"}

    assert httpx.get(site.balancer + "/admin/backends").status_code == 401
    wrong = httpx.get(site.balancer + "/admin/backends", headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    r = httpx.get(site.balancer + "/admin/backends", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert site.first in r.json()["backends"]


def test_admin_adds_and_removes_backends_at_run_time(site: Site) -> None:
    first, second = site.first, site.second
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=site.balancer, timeout=5, headers=auth) as client:

        def nodes(until: set[str] | None = None, tries: int = 8) -> set[str]:
            # A backend added at run time ramps up over the trust policy's slow start
            # (10% of its share at first), so reaching it may take many requests: bounded.
            seen: set[str] = set()
            for i in range(tries):
                seen.add(client.get("/work", params={"key": str(i)}).json()["node"])
                if seen == until:
                    break
            return seen

        assert nodes() == {"first"}
        r = client.post("/admin/backends", json={"url": second + "/"})
        assert r.status_code == 201
        assert r.json() == {"backends": [first, second]}
        assert client.post("/admin/backends", json={"url": second}).status_code == 409
        assert client.post("/admin/backends", json={"url": "not a url"}).status_code == 422
        assert nodes(until={"first", "second"}, tries=400) == {"first", "second"}
        assert [b["url"] for b in client.get("/trust").json()["backends"]] == [first, second]

        r = client.request("DELETE", "/admin/backends", json={"url": first})
        assert r.status_code == 200
        assert r.json() == {"backends": [second]}
        assert client.delete("/admin/backends", params={"url": first}).status_code == 404
        assert nodes() == {"second"}
        metrics = client.get("/metrics").text
        assert f'twlb_balancer_backend_up{{backend="{second}"}} 1.0' in metrics
        assert f'twlb_balancer_backend_up{{backend="{first}"}}' not in metrics

        # Put the module's balancer back as the other tests expect it.
        assert client.post("/admin/backends", json={"url": first}).status_code == 201
        assert client.delete("/admin/backends", params={"url": second}).status_code == 200


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:0", "port must be 1..65535"),
        ("http://127.0.0.1:65536", "out of range"),
        ("http://127.0.0.1\x00:8001", "control character"),
        ("http://a b:1", "space or control character"),
        ("http://-bad.example:1", "neither an IP address nor a DNS name"),
    ],
)
def test_admin_refuses_a_backend_url_the_upstream_client_cannot_use(
    site: Site, url: str, complaint: str
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=site.balancer, timeout=5, headers=auth) as client:
        r = client.post("/admin/backends", json={"url": url})
        assert r.status_code == 422, r.text
        assert complaint in r.text
        r = client.request("DELETE", "/admin/backends", params={"url": url})
        assert r.status_code == 422 and complaint in r.json()["error"]
        assert client.get("/admin/backends").json() == {"backends": [site.first]}


def test_trust_reports_every_backend_with_its_window_features(site: Site) -> None:
    with httpx.Client(base_url=site.balancer, timeout=5) as client:
        for i in range(20):
            assert client.get("/work", params={"key": str(i)}).status_code == 200
        deadline = time.monotonic() + 5
        while True:  # features are recomputed every trust tick (0.5 s)
            report = client.get("/trust").json()
            row = next(b for b in report["backends"] if b["url"] == site.first)
            if row["features"].get("request_count_log1p", 0) > 0:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.1)
        metrics = client.get("/metrics").text
    assert report["policy"] == "trust"
    assert report["window_s"] == 2.0
    assert report["model"]["version"]
    assert {"weight", "state", "held", "health", "features", "probabilities"} <= set(row)
    assert 0.0 <= row["weight"] <= 1.0
    assert row["features"]["success_ratio"] == 1.0
    assert abs(sum(row["probabilities"].values()) - 1.0) < 1e-6
    # The same windows are readable through Prometheus.
    feature = f'twlb_balancer_feature{{backend="{site.first}",feature="success_ratio"}} 1.0'
    assert feature in metrics
    assert f'twlb_balancer_trust{{backend="{site.first}"}}' in metrics


def test_consistent_hash_routes_by_the_key_parameter_or_the_key_header(site: Site) -> None:
    with httpx.Client(base_url=site.hashing, timeout=5) as client:

        def node(key: str, header: str | None = None) -> str:
            headers = {"X-TWLB-Key": header} if header is not None else {}
            r = client.get("/work", params={"key": key}, headers=headers)
            assert r.status_code == 200
            return r.json()["node"]

        owners = {f"user-{i}": node(f"user-{i}") for i in range(24)}
        assert set(owners.values()) == {"first", "second"}
        for key, owner in owners.items():
            assert node(key) == owner
            # The header wins over the query parameter as the routing key.
            other = next(k for k, o in owners.items() if o != owner)
            assert node(other, header=key) == owner
