"""The dashboard server against a real two-node cluster: the page, its JSON, its pushed
stream, its bounds, and the control token never leaving the server."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from twlb.dashboard import server as dashboard_server
from twlb.dashboard.server import DashboardServer, StateDirSource
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.processes.managed import free_port_range, twlb_argv

from twlb.spec import TrustCluster


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tc = TrustCluster.model_validate(
        {
            "apiVersion": "twlb.dev/v1alpha1",
            "kind": "TrustCluster",
            "metadata": {"name": "page"},
            "spec": {"backends": 2, "seed": 1, "policy": "trust"},
        }
    )
    state = tmp_path_factory.mktemp("page")
    cluster = EmbeddedCluster(tc, port_base=free_port_range(4), state_dir=state, prometheus=False)
    with cluster:
        page = DashboardServer(StateDirSource(state), interval_s=0.3)
        page.start()
        try:
            yield cluster, page
        finally:
            page.stop()


def _sse_events(url: str, count: int) -> list[tuple[str, dict]]:
    """The first `count` events of the stream at `url`, as (event, data)."""
    out: list[tuple[str, dict]] = []
    with httpx.stream("GET", url, timeout=10.0) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                if len(out) == count:
                    break
    return out


def test_the_stream_sends_a_snapshot_then_a_frame_per_round(running):
    cluster, page = running
    events = _sse_events(page.url + "api/events", 3)
    assert [e for e, _ in events] == ["snapshot", "frame", "frame"]
    frame = events[-1][1]
    assert {c["name"] for c in frame["backends"]} == {n.name for n in cluster.nodes}
    assert all(c["truth"] == "healthy" for c in frame["backends"])
    for n in cluster.nodes:  # each node's gossip view as it answers it (404: "off")
        answer = httpx.get(n.url + "/gossip", timeout=5)
        if answer.status_code == 404:
            assert frame["gossip"][n.url] == "off"
        else:
            doc = answer.json()
            view = frame["gossip"][n.url]
            assert (view["protocol"], view["self"]) == (doc["protocol"], doc["self"])
            assert {m["node"] for m in view["members"]} == {m["node"] for m in doc["members"]}
    assert events[2][1]["t"] > events[1][1]["t"]


def test_the_page_and_its_files_are_served_with_a_strict_policy(running):
    _, page = running
    html = httpx.get(page.url)
    assert html.status_code == 200
    assert "script-src 'self'" in html.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert httpx.get(page.url + "static/" + name).status_code == 200
    assert httpx.get(page.url + "static/../server.py").status_code == 404
    assert httpx.get(page.url + "static/nope.js").status_code == 404


def test_no_response_carries_a_token(running):
    cluster, page = running
    bodies = [
        httpx.get(page.url).text,
        httpx.get(page.url + "static/app.js").text,
        httpx.get(page.url + "api/state").text,
        json.dumps(_sse_events(page.url + "api/events", 2)),
    ]
    for body in bodies:
        assert cluster.control_token not in body
        assert cluster.admin_token not in body


def test_streams_beyond_the_bound_get_503(running, monkeypatch):
    _, page = running
    monkeypatch.setattr(dashboard_server, "MAX_STREAMS", 0)
    r = httpx.get(page.url + "api/events", timeout=5.0)
    assert r.status_code == 503


def _silent_streams(page_url: str, count: int, source: str) -> list[socket.socket]:
    """`count` event streams opened from `source` that never read a byte."""
    host, port = page_url.split("//")[1].rstrip("/").split(":")
    held = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
        sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: page\r\n\r\n")
        held.append(sock)
    return held


def _streams(page_url: str) -> int:
    return httpx.get(page_url + "healthz", timeout=5).json()["streams"]


def test_streams_that_never_read_cannot_keep_a_page_out(running):
    _, page = running
    url = page.url + "api/events"
    # A full house of streams that read nothing, from the page's own address: a new page
    # takes the place of the oldest of them.
    silent = _silent_streams(page.url, dashboard_server.MAX_STREAMS, "127.0.0.1")
    try:
        deadline = time.monotonic() + 10
        while _streams(page.url) < dashboard_server.MAX_STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _streams(page.url) == dashboard_server.MAX_STREAMS
        assert [e for e, _ in _sse_events(url, 2)] == ["snapshot", "frame"]
    finally:
        for sock in silent:
            sock.close()
    # From another address they displace their own oldest, never a page of this one.
    silent = _silent_streams(page.url, dashboard_server.MAX_STREAMS - 1, "127.0.0.2")
    try:
        with httpx.stream("GET", url, timeout=10.0) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("event: ")) == "event: snapshot"
            more = _silent_streams(page.url, 8, "127.0.0.2")
            silent += more
            frames = 0
            for line in lines:  # the page still gets its frames
                frames += line == "event: frame"
                if frames == 3:
                    break
            assert frames == 3
            assert _streams(page.url) == dashboard_server.MAX_STREAMS
    finally:
        for sock in silent:
            sock.close()


def test_the_page_follows_a_fault_switched_through_the_runtime(running):
    cluster, page = running
    from twlb.spec import FaultSpec

    cluster.set_fault(1, FaultSpec(type="delay", delay_ms=50))
    try:
        for _, data in _sse_events(page.url + "api/events", 8):
            if any(e["kind"] == "fault" for e in data["events"]):
                break
        else:
            raise AssertionError("no fault event in eight pushes")
        card = next(c for c in data["backends"] if c["name"] == cluster.nodes[1].name)
        assert (card["fault"], card["truth"]) == ("delay", "delay")
    finally:
        cluster.set_fault(1, FaultSpec(type="benign"))


def test_a_chaos_action_is_in_the_event_log(running):
    """twlb.chaos actions record what they did in the state directory; the page logs it."""
    from twlb.chaos import actions

    cluster, page = running
    victim = cluster.nodes[0].name
    actions.set_fault(victim, {"type": "error", "probability": 0.5}, str(cluster.state_dir))
    try:
        for _, data in _sse_events(page.url + "api/events", 8):
            chaos = [e for e in data["events"] if e["kind"] == "chaos"]
            if chaos:
                break
        else:
            raise AssertionError("no chaos event in eight pushes")
        assert chaos[0]["node"] == victim
        assert chaos[0]["text"] == f"chaos set_fault: {victim} -> error"
    finally:
        actions.restore_fault(victim, str(cluster.state_dir))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--state-dir", "/nonexistent/twlb"], "no cluster"),
        (["--balancer", "ftp://127.0.0.1:1"], "not an http(s) URL"),
        (["--balancer", "http://127.0.0.1:1", "--state-dir", "x"], "not both"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(args: list[str], needle: str, tmp_path: Path):
    out = subprocess.run(
        twlb_argv("dashboard", "--port", "0", *args), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr


def test_the_kubernetes_sidecar_command_shows_the_cluster_behind_a_balancer(running, tmp_path):
    """The operator's sidecar runs `twlb dashboard --balancer ...` with the control token in
    its environment; that very command line, pointed at a real balancer, shows every node
    with its true fault."""
    from twlb.operator import render
    from twlb.processes.managed import ManagedProcess, free_port

    from twlb.spec import TrustClusterSpec

    cluster, _ = running
    owner = render.Owner(name="lab", namespace="twlb", uid="0f4c2b64-3c2e-4d4e-9a55-1f1b5d0c2a77")
    sidecar = render.render_dashboard_sidecar(owner, TrustClusterSpec(backends=2))
    args = sidecar["args"]
    # The balancer's admin listener (its traffic port proxies /trust to the backends).
    assert args[:3] == ["dashboard", "--balancer", f"http://127.0.0.1:{render.ADMIN_PORT}"]
    assert "readinessProbe" not in sidecar  # the page never takes the balancer out of service
    (token_env,) = sidecar["env"]
    assert token_env["valueFrom"]["secretKeyRef"]["key"] == render.TOKENS_CONTROL_KEY
    port = free_port()
    local = ["dashboard", "--balancer", cluster.admin_url, "--host", "127.0.0.1"]
    proc = ManagedProcess(
        twlb_argv(*local, "--port", str(port), "--interval", "0.3"),
        env={token_env["name"]: cluster.control_token},
        log_path=tmp_path / "sidecar.log",
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_ready(url + "/healthz", timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cards = httpx.get(url + "/api/state").json()["backends"]
            if len(cards) == 2 and all(c["truth"] for c in cards):
                break
            time.sleep(0.2)
        assert {c["url"] for c in cards} == {n.url for n in cluster.nodes}
        assert {c["fault"] for c in cards} == {n.fault.type.value for n in cluster.nodes}
    finally:
        proc.stop()


def test_a_removed_replica_leaves_the_page_at_once_and_scaling_is_in_the_event_log(running):
    """`twlb replicas add` and `rm` on the runtime: the new replica's card comes with an
    add event, and once removed its card is gone the next round (not five minutes on)."""
    cluster, page = running

    def state_with(predicate) -> dict:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = httpx.get(page.url + "api/state", timeout=5).json()
            if predicate(state):
                return state
            time.sleep(0.1)
        raise AssertionError("the page did not follow the change within 10 s")

    (added,) = cluster.replicas.add(1)
    try:
        state = state_with(lambda s: added["url"] in {c["url"] for c in s["backends"]})
        events = [(e["kind"], e["node"]) for e in state["events"]]
        assert ("add", added["name"]) in events
    finally:
        cluster.replicas.remove(names=[added["name"]])
    removed_at = time.monotonic()
    state = state_with(lambda s: added["url"] not in {c["url"] for c in s["backends"]})
    assert time.monotonic() - removed_at < 3  # a round or two at 0.3 s, not the history span
    assert ("remove", added["name"]) in [(e["kind"], e["node"]) for e in state["events"]]
    assert len(state["backends"]) == 2
