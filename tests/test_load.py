"""`twlb load` end to end: a real generator process against a real backend on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_client_support import ControlledNode, node_fixture  # noqa: F401  (the node fixture)
from twlb.client.breaker import BreakerConfig
from twlb.client.client import ClientPolicy
from twlb.client.load import LoadPlan, Mode, RunControl, run_load
from twlb.client.report import FAILURE_REASONS, build_report
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.cli import main

RUN_TIMEOUT_S = 60.0


def _load(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twlb_argv("load", *args),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_report_has_every_field_and_the_rate_asked_for(
    node: ControlledNode, tmp_path: Path
) -> None:
    node.set_fault(type="benign")
    out = tmp_path / "report.json"
    run = _load(
        "--url", node.url, "--duration", "2", "--out", str(out), env={"TWLB_LOAD_RATE": "100"}
    )
    assert run.returncode == 0, run.stderr
    r = _report(out)
    assert (r["mode"], r["url"], r["partial"], r["unreachable"]) == (
        "resilient",
        node.url,
        False,
        False,
    )
    assert r["target_rate"] == 100.0 and r["target_duration_s"] == 2.0
    assert r["duration_s"] == pytest.approx(2.0, abs=0.5)
    assert r["sent"] == 200
    assert r["correct"] == 200 and r["wrong"] == 0 and r["failed"] == 0
    assert set(r["failed_by_reason"]) == set(FAILURE_REASONS)
    assert r["achieved_rate"] == pytest.approx(100.0, rel=0.05)
    for key in ("latency_ms", "latency_all_ms"):
        lat = r[key]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert lat["count"] == 200
    for key in ("retries", "breaker_transitions", "duration_s", "max_send_lag_ms", "throughput"):
        assert key in r
    assert "achieved rate" in run.stdout and "correct" in run.stdout


def test_count_ends_a_run_before_its_duration_across_workers(
    node: ControlledNode, tmp_path: Path
) -> None:
    node.set_fault(type="benign")
    out = tmp_path / "report.json"
    started = time.monotonic()
    run = _load(
        "--url", node.url, "--rate", "100", "--duration", "60", "--count", "30",
        "--workers", "2", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 20.0
    r = _report(out)
    assert (r["sent"], r["correct"], r["workers"]) == (30, 30, 2)
    assert r["latency_ms"]["count"] == 30
    assert run.stdout == ""  # --quiet


def test_wrong_answers_from_a_byzantine_backend_are_counted(
    node: ControlledNode, tmp_path: Path
) -> None:
    node.set_fault(type="byzantine")
    out = tmp_path / "report.json"
    run = _load(
        "--url", node.url, "--mode", "basic", "--rate", "100", "--count", "40",
        "--keys", "7", "--rounds", "3", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    r = _report(out)
    assert (r["sent"], r["wrong"], r["correct"], r["failed"]) == (40, 40, 0, 0)
    # the liar is named: the node field of every wrong body
    [(liar, lies)] = r["wrong_by_node"].items()
    assert lies == 40 and liar != "?"
    assert r["latency_ms"]["count"] == 0 and r["latency_all_ms"]["count"] == 40
    assert r["retries"] == 0 and "breaker" not in r


async def test_retries_and_breaker_transitions_show_in_the_report(node: ControlledNode) -> None:
    node.set_fault(type="error", probability=1.0)
    plan = LoadPlan(
        url=node.url,
        rate=100.0,
        duration_s=0.8,
        mode=Mode.RESILIENT,
        client=ClientPolicy(
            breaker=BreakerConfig(minimum_calls=10, window_size=10, wait_in_open_s=0.3)
        ),
    )
    try:
        tally = await run_load(plan, RunControl())
    finally:
        node.set_fault(type="benign")
    r = build_report(tally, plan.settings())
    assert r["sent"] == 80 and r["correct"] == 0 and not r["unreachable"]
    assert r["retries"] >= 1
    assert r["failed_by_reason"]["http_5xx"] >= 1 and r["failed_by_reason"]["breaker_open"] >= 1
    log = [(t["from"], t["to"]) for t in r["breaker_transition_log"]]
    assert log[:2] == [("closed", "open"), ("open", "half_open")]
    assert r["breaker_transitions"] == len(log) >= 3
    assert r["breaker"]["minimum_calls"] == 10


def _interrupt_once_serving(
    node: ControlledNode, tmp_path: Path, *args: str
) -> tuple[int, float, dict]:
    """Run `twlb load ARGS --out F`, SIGINT it once the node has answered some of its
    requests; return the exit status, seconds from SIGINT to exit, and the report."""
    out = tmp_path / "report.json"
    served_before = node.requests_served()
    proc = ManagedProcess(
        twlb_argv("load", "--url", node.url, "--quiet", "--out", str(out), *args),
        log_path=tmp_path / "load.log",
    ).start()
    try:
        deadline = time.monotonic() + 30.0
        while node.requests_served() < served_before + 10:
            assert time.monotonic() < deadline and proc.alive(), "the load never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        assert proc.popen is not None
        status = proc.popen.wait(timeout=20.0)
        stopped_after = time.monotonic() - interrupted
    finally:
        proc.stop()
    assert out.exists(), (tmp_path / "load.log").read_text()
    return status, stopped_after, _report(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_stops_early_and_writes_a_partial_report(
    node: ControlledNode, tmp_path: Path, workers: int
) -> None:
    node.set_fault(type="benign")
    status, _, r = _interrupt_once_serving(
        node, tmp_path, "--rate", "50", "--duration", "30", "--workers", str(workers)
    )
    assert status == 130
    assert r["partial"] is True and r["stop_reason"] == "interrupted"
    assert 0 < r["sent"] < 50 * 30
    assert r["sent"] == r["correct"] + r["wrong"] + r["failed"]


def test_hard_stop_cancels_calls_still_in_flight_after_an_interrupt(
    node: ControlledNode, tmp_path: Path
) -> None:
    # Half the calls hang for 20 s and both the try timeout and the deadline allow it:
    # only the bounded drain after SIGINT can end the run quickly.
    node.set_fault(type="delay", probability=0.5, delayMs=20_000)
    try:
        status, stopped_after, r = _interrupt_once_serving(
            node, tmp_path, "--rate", "40", "--duration", "60", "--timeout", "30",
            "--deadline", "30",
        )  # fmt: skip
    finally:
        node.set_fault(type="benign")
    assert status == 130
    assert stopped_after < 10.0  # the 2 s drain bound plus start-up noise, not 20 s
    assert r["partial"] is True
    assert r["failed_by_reason"]["cancelled"] >= 1
    assert r["sent"] == r["correct"] + r["wrong"] + r["failed"]


def test_unreachable_target_is_reported_once_the_breaker_opens(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = _load("--url", url, "--rate", "200", "--duration", "60", "--quiet", "--out", str(out))
    assert time.monotonic() - started < 30.0  # far from the 60 s asked for (start-up included)
    assert run.returncode == 2
    assert "unreachable" in run.stderr
    r = _report(out)
    assert r["unreachable"] is True and "breaker opened" in r["stop_reason"]
    assert r["breaker_transitions"] >= 1 and r["correct"] == 0
    assert r["failed_by_reason"]["connect_error"] >= 1
    assert r["sent"] == r["failed"] < 200 * 5


def test_unreachable_target_in_basic_mode_counts_connect_errors(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}"
    run = _load(
        "--url", url, "--mode", "basic", "--rate", "50", "--duration", "1",
        "--quiet", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 2
    r = _report(out)
    assert r["unreachable"] is True
    assert r["sent"] == 50
    assert r["failed_by_reason"]["connect_error"] == 50


class NotHTTPServer(socketserver.ThreadingTCPServer):
    """A loopback server that answers every connection in another protocol and closes."""

    daemon_threads = True

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError):
                self.request.recv(4096)
                self.request.sendall(b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n")


@pytest.fixture
def not_http() -> Iterator[str]:
    server = NotHTTPServer(("127.0.0.1", 0), NotHTTPServer.Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("mode", ["basic", "resilient"])
def test_a_target_that_is_not_http_is_unreachable_with_exit_2_and_no_tracebacks(
    not_http: str, mode: str, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    run = _load(
        "--url", not_http, "--mode", mode, "--rate", "50", "--duration", "1",
        "--quiet", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "target unreachable" in run.stderr and not_http in run.stderr
    for noise in ("Task exception was never retrieved", "Traceback"):
        assert noise not in run.stderr and noise not in run.stdout
    r = _report(out)
    assert r["unreachable"] is True and r["correct"] == 0
    # Every call failed; a resilient run's calls may also end on the open breaker.
    assert r["failed"] == r["sent"] > 0 and r["failed_by_reason"]["connect_error"] > 0


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--url", "not a url"], "--url"),
        (["--url", "ftp://127.0.0.1:1"], "http://"),
        (["--url", "http://"], "--url"),
        (["--url", "http://127.0.0.1:1/?x=1"], "query"),
        (["--url", "http://127.0.0.1:1", "--rate", "0"], "--rate"),
        (["--url", "http://127.0.0.1:1", "--rate", "-5"], "--rate"),
        (["--url", "http://127.0.0.1:1", "--duration", "0"], "--duration"),
        (["--url", "http://127.0.0.1:1", "--count", "0"], "--count"),
        (["--url", "http://127.0.0.1:1", "--mode", "eager"], "--mode"),
        (["--url", "http://127.0.0.1:1", "--key-prefix", "x" * 300], "--key-prefix"),
        ([], "--url"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(main, ["load", *args])
    assert result.exit_code == 2, result.output
    assert complaint in result.output


def test_bad_rate_from_the_environment_exits_2() -> None:
    result = CliRunner().invoke(
        main, ["load", "--url", "http://127.0.0.1:1"], env={"TWLB_LOAD_RATE": "-1"}
    )
    assert result.exit_code == 2 and "rate" in result.output
