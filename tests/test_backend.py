"""Real backend nodes on loopback: each fault's observable effect, control, metrics, bad input.

Each test has a node of its own, but the module starts them all at once: start-up (the
imports) dominates on a busy two-core machine, and started together they overlap.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from twlb.backend.app import CRASH_EXIT_STATUS
from twlb.backend.simulation import NodeProfile
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

from twlb.cli import main
from twlb.spec import FaultSpec, FaultType
from twlb.work import digest

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# No simulated latency or loss, so counts and latencies show the fault alone.
QUIET = ("--no-simulation",)

#: node name -> (flags, environment) of the node each test uses.
FLEET: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "simulated": (("--node-id", "n-1", "--seed", "4"), {}),
    "plain": ((*QUIET, "--node-id", "v"), {}),
    "error": (
        (
            *QUIET,
            "--seed",
            "21",
            "--node-id",
            "e",
            *FaultSpec(type=FaultType.ERROR, probability=0.3).to_args(),
        ),
        {},
    ),
    "byzantine": (
        (*QUIET, "--seed", "8"),
        FaultSpec(type=FaultType.BYZANTINE, probability=0.5).to_env(),
    ),
    "crash": ((*QUIET, "--fault-type", "crash", "--fault-probability", "0.2"), {}),
    "lossy": ((*QUIET, "--packet-loss", "0.3", "--node-id", "lossy"), {}),
    "delay": ((*QUIET, "--control-token", TOKEN, "--node-id", "d"), {}),
    "flapping": ((*QUIET, "--control-token", TOKEN), {}),
    "control": ((*QUIET, "--control-token", TOKEN, "--node-id", "ctl"), {}),
}
Fleet = dict[str, tuple[ManagedProcess, str]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Every node of FLEET, started together; each stopped by its pid at the end."""
    logs: Path = tmp_path_factory.mktemp("fleet")
    nodes: Fleet = {}
    ports: set[int] = set()
    try:
        for name, (args, env) in FLEET.items():
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            argv = twlb_argv("backend", "--host", "127.0.0.1", "--port", str(port), *args)
            proc = ManagedProcess(argv, env=env, log_path=logs / f"{name}.log").start()
            nodes[name] = (proc, f"http://127.0.0.1:{port}")
        for proc, url in nodes.values():
            proc.wait_ready(url + "/healthz", timeout=90)
        yield nodes
    finally:
        for proc, _ in nodes.values():
            proc.stop()
        for proc, _ in nodes.values():
            assert not pid_alive(proc.pid), f"process {proc.pid} outlived its test"


def work(client: httpx.Client, key: str = "k", rounds: int = 1) -> httpx.Response:
    return client.get("/work", params={"key": key, "rounds": rounds})


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (0.0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def put_fault(client: httpx.Client, **fault: object) -> httpx.Response:
    return client.put("/control/fault", json=fault, headers=AUTH)


def timed(client: httpx.Client) -> float:
    t = time.perf_counter()
    r = work(client)
    assert r.status_code == 200
    return time.perf_counter() - t


def test_benign_simulated_node_answers_the_work_contract(fleet: Fleet) -> None:
    _, url = fleet["simulated"]
    answered = dropped = 0
    with httpx.Client(base_url=url, timeout=5) as c:
        for i in range(60):
            key, rounds = f"héllo wörld {i}", 1 + i % 4
            try:
                r = work(c, key=key, rounds=rounds)
            except httpx.TransportError:
                dropped += 1  # simulated packet loss: rare, and never a 5xx
                continue
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            assert r.json() == {
                "node": "n-1",
                "key": key,
                "rounds": rounds,
                "digest": digest(key, rounds),
            }
            answered += 1
        assert dropped <= 3
        assert c.get("/healthz").json() == {"status": "ok", "node": "n-1"}
        assert c.get("/readyz").json() == {"status": "ready", "node": "n-1"}
        m = c.get("/metrics")
        assert m.headers["content-type"].startswith("text/plain")
        text = m.text
    assert metric(text, "twlb_node_requests_total", node="n-1", code="200") == answered
    assert metric(text, "twlb_node_dropped_connections_total", node="n-1") == dropped
    assert metric(text, "twlb_node_request_duration_seconds_count", node="n-1") == answered
    assert metric(text, "twlb_node_in_flight_requests", node="n-1") == 0
    assert 0.0 < metric(text, "twlb_node_cpu_utilization_ratio", node="n-1") <= 1.0
    assert metric(text, "twlb_node_memory_bytes", node="n-1") > 50 * 2**20
    # The live node is the simulation its seed describes.
    assert metric(text, "twlb_node_network_latency_seconds", node="n-1") == pytest.approx(
        NodeProfile.from_seed(4).network_latency_s
    )
    assert metric(text, "twlb_node_fault_info", node="n-1", type="benign") == 1
    assert metric(text, "twlb_node_fault_info", node="n-1", type="error") == 0


def test_malformed_work_queries_are_422s_naming_the_field(fleet: Fleet) -> None:
    _, url = fleet["plain"]
    cases = {
        "/work": "key",
        "/work?key=": "key",
        "/work?key=" + "a" * 257: "key",
        "/work?key=a%01b": "key",
        "/work?key=a&rounds=abc": "rounds",
        "/work?key=a&rounds=0": "rounds",
        "/work?key=a&rounds=10001": "rounds",
        "/work?key=a&rounds=2.5": "rounds",
        "/work?key=a&extra=1": "extra",
        # int() of 5,000 digits raises; it is out of range, not an internal error.
        "/work?key=a&rounds=" + "9" * 5000: "rounds",
        # Percent-escapes that are not UTF-8 are refused, not replaced by U+FFFD.
        "/work?key=%ff%fe": "key",
    }
    with httpx.Client(base_url=url, timeout=5) as c:
        for path, field in cases.items():
            r = c.get(path)
            assert r.status_code == 422, path
            body = r.json()
            assert [p["field"] for p in body["problems"]] == [field], path
            assert field in body["error"]
        # A key that is UTF-8 once percent-decoded is a key like any other.
        r = c.get("/work?key=%C3%A9t%C3%A9")
        assert r.status_code == 200 and r.json()["digest"] == digest("été")
        assert c.post("/work?key=a").status_code == 405
        text = c.get("/metrics").text
    assert metric(text, "twlb_node_requests_total", node="v", code="422") == len(cases)
    assert metric(text, "twlb_node_requests_total", node="v", code="405") == 1
    # Without simulation a node reports its real process: RSS, and no simulated network.
    assert metric(text, "twlb_node_memory_bytes", node="v") > 10 * 2**20
    assert metric(text, "twlb_node_network_latency_seconds", node="v") == 0


def test_error_fault_at_0_3_gives_about_30_percent_500s(fleet: Fleet) -> None:
    _, url = fleet["error"]
    n = 300
    with httpx.Client(base_url=url, timeout=5) as c:
        answers = [work(c, key=f"e{i}") for i in range(n)]
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 500}
    share = codes.count(500) / n
    # Binomial sd at n=300 is 0.026; the tolerance is three of them.
    assert abs(share - 0.3) < 0.08, share
    error = next(r for r in answers if r.status_code == 500)
    assert error.json() == {"node": "e", "error": "injected fault: error"}


def test_byzantine_fault_from_env_answers_200_with_wrong_digests(fleet: Fleet) -> None:
    _, url = fleet["byzantine"]
    n = 150
    wrong = 0
    with httpx.Client(base_url=url, timeout=5) as c:
        for i in range(n):
            r = work(c, key=f"b{i}", rounds=2)
            assert r.status_code == 200
            d = r.json()["digest"]
            assert re.fullmatch(r"[0-9a-f]{64}", d)
            wrong += d != digest(f"b{i}", 2)
    assert abs(wrong / n - 0.5) < 0.12, wrong  # 3 sd of a binomial at n=150


def test_crash_fault_ends_the_process_with_a_nonzero_status(fleet: Fleet) -> None:
    proc, url = fleet["crash"]
    answered = 0
    with httpx.Client(base_url=url, timeout=5) as c:
        for i in range(200):
            try:
                r = work(c, key=f"c{i}")
            except httpx.TransportError:
                break  # the crashing request's connection just drops
            assert r.status_code == 200
            answered += 1
        else:
            pytest.fail("no crash in 200 requests at probability 0.2")
    assert proc.popen is not None
    assert proc.popen.wait(10) == CRASH_EXIT_STATUS
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)


def test_packet_loss_drops_connections_without_an_http_answer(fleet: Fleet) -> None:
    _, url = fleet["lossy"]
    n = 150
    dropped = 0
    with httpx.Client(base_url=url, timeout=5) as c:
        for i in range(n):
            try:
                r = work(c, key=f"p{i}")
            except httpx.RemoteProtocolError:
                dropped += 1  # "server disconnected without sending a response"
                continue
            assert r.status_code == 200
        text = c.get("/metrics").text
    assert abs(dropped / n - 0.3) < 0.12, dropped  # 3 sd of a binomial at n=150
    assert metric(text, "twlb_node_dropped_connections_total", node="lossy") == dropped
    assert metric(text, "twlb_node_requests_total", node="lossy", code="200") == n - dropped


def test_delay_shifts_latency_and_lie_latency_hides_it_from_its_metrics(fleet: Fleet) -> None:
    _, url = fleet["delay"]
    n = 6
    with httpx.Client(base_url=url, timeout=5) as c:
        base = statistics.median(timed(c) for _ in range(n))
        before = c.get("/metrics").text
        assert put_fault(c, type="delay", delayMs=150).status_code == 200
        delayed = statistics.median(timed(c) for _ in range(n))
        # A request being delayed is in flight.
        in_flight = 0.0
        with httpx.Client(base_url=url, timeout=5) as other:
            t = threading.Thread(target=work, args=(other,))
            t.start()
            while t.is_alive():
                text = c.get("/metrics").text
                in_flight = max(in_flight, metric(text, "twlb_node_in_flight_requests", node="d"))
            t.join()
        after_delay = c.get("/metrics").text
        r = put_fault(c, type="lie-latency", delayMs=150)
        assert r.json()["fault"]["type"] == "lie-latency"
        lied = statistics.median(timed(c) for _ in range(n))
        after_lie = c.get("/metrics").text
        truth = c.get("/control/fault", headers=AUTH).json()
    assert delayed - base == pytest.approx(0.150, abs=0.05)
    assert lied - base == pytest.approx(0.150, abs=0.05)
    assert in_flight == 1

    def reported_mean(a: str, b: str) -> float:
        """Mean latency the node reported for the requests between two scrapes."""
        count, total = (
            metric(b, f"twlb_node_request_duration_seconds_{s}", node="d")
            - metric(a, f"twlb_node_request_duration_seconds_{s}", node="d")
            for s in ("count", "sum")
        )
        return total / count

    assert reported_mean(before, after_delay) > 0.14  # an honest slow node
    assert reported_mean(after_delay, after_lie) < 0.05  # a slow node that says it is fast
    assert metric(after_delay, "twlb_node_fault_info", node="d", type="delay") == 1
    assert metric(after_lie, "twlb_node_fault_info", node="d", type="benign") == 1
    assert metric(after_lie, "twlb_node_fault_info", node="d", type="lie-latency") == 0
    # The control endpoint is the ground truth the runtime reads.
    assert truth["fault"]["type"] == "lie-latency" and truth["fault"]["delayMs"] == 150


def test_flapping_alternates_healthy_and_faulty_periods(fleet: Fleet) -> None:
    period = 0.5
    _, url = fleet["flapping"]
    runs: list[list[float]] = []  # [status, time of its first answer]
    with httpx.Client(base_url=url, timeout=5) as c:
        put_fault(c, type="flapping", periodS=period, flapType="error")
        start = time.monotonic()
        while time.monotonic() - start < 4.6 * period:
            code = work(c).status_code
            if not runs or runs[-1][0] != code:
                runs.append([code, time.monotonic()])
            time.sleep(0.02)
        state = c.get("/control/fault", headers=AUTH).json()
    assert [code for code, _ in runs][:5] == [200, 500, 200, 500, 200]
    # Each whole run in between lasts one period (answers are 20 ms apart, plus load).
    for (_, began), (_, ended) in zip(runs[1:-1], runs[2:], strict=False):
        assert ended - began == pytest.approx(period, abs=0.2)
    # The node's own account of its current half agrees with the fault's age (activeForS is
    # rounded to the millisecond, so skip the instant of a switch).
    age = state["activeForS"]
    if min(age % period, period - age % period) > 0.002:
        assert state["faultyNow"] is (int(age / period) % 2 == 1)


def test_control_endpoint_is_403_without_a_configured_token(fleet: Fleet) -> None:
    _, url = fleet["plain"]
    for method in ("GET", "PUT"):
        r = httpx.request(method, url + "/control/fault", headers=AUTH, json={"type": "crash"})
        assert r.status_code == 403
        assert "--control-token" in r.json()["error"]
    with httpx.Client(base_url=url, timeout=5) as c:
        assert work(c).status_code == 200


def test_control_endpoint_authenticates_and_switches_faults_at_run_time(fleet: Fleet) -> None:
    proc, url = fleet["control"]
    with httpx.Client(base_url=url, timeout=5) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            for method in ("GET", "PUT"):
                r = c.request(method, "/control/fault", headers=headers, json={"type": "error"})
                assert r.status_code == 401, (method, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        state = c.get("/control/fault", headers=AUTH).json()
        assert state["node"] == "ctl" and state["faultyNow"] is False
        assert state["fault"] == FaultSpec().model_dump(mode="json", by_alias=True)
        r = put_fault(c, type="error", probability=1.0, errorStatus=503)
        assert r.status_code == 200 and r.json()["fault"]["errorStatus"] == 503
        assert work(c).status_code == 503
        # Invalid bodies are 422s naming the field; the previous fault stays.
        for body, field in [
            ({"type": "nonsense"}, "type"),
            ({"type": "error", "probability": 2}, "probability"),
            ({"type": "delay", "delayMs": -1}, "delayMs"),
            ({"type": "error", "colour": "red"}, "colour"),
            # A period nobody could observe, whose period count overflows (was applied,
            # then every /work answered 500).
            ({"type": "flapping", "periodS": 5e-324}, "periodS"),
            ({"type": "flapping", "periodS": 0.001}, "periodS"),
        ]:
            r = c.put("/control/fault", json=body, headers=AUTH)
            assert r.status_code == 422, body
            assert [p["field"] for p in r.json()["problems"]] == [field]
        r = c.put("/control/fault", json={"type": "flapping", "flapType": "benign"}, headers=AUTH)
        assert r.status_code == 422 and "flapType" in r.json()["error"]
        r = c.put("/control/fault", content=b"{not json", headers=AUTH)
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "body"
        assert c.get("/control/fault", headers=AUTH).json()["fault"]["type"] == "error"
        assert work(c).status_code == 503
        # snake_case fields work as well as camelCase.
        r = put_fault(c, type="delay", delay_ms=1)
        assert r.json()["fault"]["delayMs"] == 1
        assert work(c).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "twlb_node_fault_info", node="ctl", type="delay") == 1
    assert metric(text, "twlb_node_fault_info", node="ctl", type="error") == 0
    # Graceful on SIGTERM: uvicorn finishes, then re-raises the signal for the parent to see.
    assert proc.stop() == -signal.SIGTERM
    assert proc.log_path is not None
    assert "Application shutdown complete" in proc.log_path.read_text()


@pytest.mark.parametrize(
    ("args", "env", "option"),
    [
        (["--fault-probability", "1.5"], {}, "--fault-probability"),
        (["--fault-type", "sloth"], {}, "--fault-type"),
        (["--error-status", "404"], {}, "--error-status"),
        (["--period-s", "0"], {}, "--period-s"),
        (["--fault-type", "flapping", "--flap-type", "benign"], {}, "--flap-type"),
        (["--packet-loss", "2"], {}, "--packet-loss"),
        (["--port", "70000"], {}, "--port"),
        ([], {"TWLB_BACKEND_DELAY_MS": "-5"}, "TWLB_BACKEND_DELAY_MS"),
        ([], {"TWLB_BACKEND_FAULT_TYPE": "sloth"}, "--fault-type"),
        ([], {"TWLB_BACKEND_SEED": "minus one"}, "--seed"),
    ],
)
def test_bad_flags_and_env_values_exit_2_naming_the_option(
    args: list[str], env: dict[str, str], option: str
) -> None:
    result = CliRunner().invoke(main, ["backend", *args], env=env)
    assert result.exit_code == 2, result.output
    assert option in result.output


def test_bad_env_value_stops_a_real_process_with_status_2() -> None:
    env = {**FaultSpec(type=FaultType.ERROR).to_env(), "TWLB_BACKEND_FAULT_PROBABILITY": "1.5"}
    done = subprocess.run(
        twlb_argv("backend", "--port", "1"),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--fault-probability" in done.stderr
    assert "TWLB_BACKEND_FAULT_PROBABILITY" in done.stderr
