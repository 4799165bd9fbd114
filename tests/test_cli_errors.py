"""Every `twlb` command fails alike: one line on stderr naming the problem (and the
environment variable a bad value came from), exit status 2, never a traceback
(twlb/exits.py, docs/manual.md "The `twlb` command"). Each case runs the real command as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from conftest import twlb_params
from twlb.balancer.settings import ModelChoice
from twlb.processes.managed import free_port, twlb_argv

from twlb.vocabulary import PolicyName

#: Bytes that are neither UTF-8 nor JSON nor YAML nor Parquet.
BINARY = bytes(range(128, 256)) * 8


def run(
    *args: str, env: dict[str, str] | None = None, argv: list[str] | None = None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWLB_")}
    return subprocess.run(
        argv or twlb_argv(*args),
        env={**base, "COLUMNS": "100", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The single stderr line of a failed command, checked for status and words."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    [line] = lines
    assert line.startswith("twlb") and ": error: " in line, line
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    """A loopback TCP port something is listening on (at most 65000: `twlb up
    --port-base` takes no higher, to leave room for the cluster's ports)."""
    port = free_port()
    while port > 65_000:
        port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "binary.dat"
    path.write_bytes(BINARY)
    return path


# ---- ports in use --------------------------------------------------------------------


def test_backend_on_a_port_in_use(tmp_path: Path, busy_tcp: int) -> None:
    done = run("backend", "--port", str(busy_tcp), "--no-gossip", cwd=tmp_path)
    one_line(done, 2, f"127.0.0.1:{busy_tcp}", "in use")


def test_backend_whose_gossip_port_is_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", free_port()))
        port = udp.getsockname()[1]
        done = run("backend", "--port", str(port), cwd=tmp_path)  # gossip: the same number, UDP
    one_line(done, 2, "gossip", f"127.0.0.1:{port}", "in use")


def test_balancer_on_a_port_in_use(tmp_path: Path, busy_tcp: int) -> None:
    done = run("balancer", "--port", str(busy_tcp), "--model", "heuristic", cwd=tmp_path)
    one_line(done, 2, f"127.0.0.1:{busy_tcp}", "in use")


def test_dashboard_on_a_port_in_use(tmp_path: Path, busy_tcp: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"cluster": "c", "stopped": True, "nodes": []}))
    done = run("dashboard", "--state-dir", str(state), "--port", str(busy_tcp), cwd=tmp_path)
    one_line(done, 2, f"127.0.0.1:{busy_tcp}", "in use")


def test_up_on_a_port_in_use(tmp_path: Path, busy_tcp: int) -> None:
    spec = Path(__file__).resolve().parents[1] / "k8s" / "samples" / "benign.yaml"
    done = run("up", "-f", str(spec), "--port-base", str(busy_tcp), "--no-prometheus",
               "--state-dir", str(tmp_path / "s"), cwd=tmp_path)  # fmt: skip
    one_line(done, 2, f"port {busy_tcp}", "in use")


def test_operator_liveness_on_a_port_in_use(tmp_path: Path, busy_tcp: int) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        })
    )  # fmt: skip
    done = run("operator", "--liveness", f"http://127.0.0.1:{busy_tcp}/healthz",
               env={"KUBECONFIG": str(kubeconfig)}, cwd=tmp_path)  # fmt: skip
    one_line(done, 2, "liveness", f"127.0.0.1:{busy_tcp}", "in use")


def test_operator_without_kubernetes_credentials(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    done = run("operator", "--liveness", "", env=env, cwd=tmp_path)
    one_line(done, 2, "no Kubernetes credentials", "KUBECONFIG")


# ---- values from the environment name the variable ------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["balancer"], {"TWLB_BALANCER_PORT": "abc"}, ["--port", "TWLB_BALANCER_PORT"]),
        (["balancer"], {"TWLB_BALANCER_MODEL": "/nope.onnx"}, ["TWLB_BALANCER_MODEL", "/nope.onnx"]),
        (["balancer"], {"TWLB_BALANCER_TRUST_TICK_S": "-1"}, ["TWLB_BALANCER_TRUST_TICK_S"]),
        (["backend"], {"TWLB_BACKEND_FAULT_PROBABILITY": "2"},
         ["--fault-probability", "TWLB_BACKEND_FAULT_PROBABILITY"]),
        (["load", "--url", "http://127.0.0.1:9"], {"TWLB_LOAD_RATE": "-1"},
         ["--rate", "TWLB_LOAD_RATE"]),
        (["load", "--url", "http://127.0.0.1:9"], {"TWLB_LOAD_BREAKER_MIN_CALLS": "80"},
         ["--breaker-min-calls", "TWLB_LOAD_BREAKER_MIN_CALLS", "window_size"]),
        (["up", "-f", "x.yaml"], {"TWLB_UP_POLICY": "fastest"}, ["--policy", "TWLB_UP_POLICY"]),
        (["chaos", "record", "--state-dir", ".", "--out", "r", "--run-id", "r", "--seed", "0"],
         {"TWLB_CHAOS_RECORD_MAX_DURATION": "0"},
         ["--max-duration", "TWLB_CHAOS_RECORD_MAX_DURATION"]),
    ],
)  # fmt: skip
def test_a_bad_value_from_the_environment_names_the_variable(
    tmp_path: Path, args: list[str], env: dict[str, str], words: list[str]
) -> None:
    one_line(run(*args, env=env, cwd=tmp_path), 2, *words)


# ---- files that cannot be used ---------------------------------------------------------


def _steady_state_failed(path: Path) -> Path:
    probe = {"activity": {"name": "ratio"}, "tolerance_met": False, "output": 0.5}
    journal = {
        "experiment": {"title": "t"}, "run": [], "status": "completed",
        "start": "2026-01-01T00:00:00", "end": "2026-01-01T00:01:00",
        "steady_states": {"before": {"steady_state_met": False, "probes": [probe]},
                          "after": {"steady_state_met": True, "probes": []}},
    }  # fmt: skip
    path.write_text(json.dumps(journal))
    return path


def test_chaos_check_tells_an_unreadable_journal_from_a_failed_steady_state(
    tmp_path: Path, binary: Path
) -> None:
    failed = run("chaos", "check", str(_steady_state_failed(tmp_path / "j.json")), cwd=tmp_path)
    assert failed.returncode == 1 and "ratio not met" in failed.stderr
    assert "Traceback" not in failed.stderr
    one_line(run("chaos", "check", str(binary), cwd=tmp_path), 2, str(binary), "not UTF-8")
    one_line(run("chaos", "labels", str(binary), cwd=tmp_path), 2, str(binary), "not UTF-8")
    # A journal whose parts have the wrong shape: named, not a traceback.
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"experiment": {}, "run": [{"activity": 3}], "start": "x",
                               "end": "2026-01-01T00:00:00"}))  # fmt: skip
    one_line(run("chaos", "labels", str(odd), cwd=tmp_path), 2, "not a chaos journal")
    # `python -m twlb.chaos` is the same command.
    module = [sys.executable, "-P", "-m", "twlb.chaos", "check", str(binary)]
    one_line(run(argv=module, cwd=tmp_path), 2, "twlb chaos check", "not UTF-8")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["chaos", "dataset", "--recording", "{bin}", "--journal", "{j}", "--out", "o.parquet"],
         ["--recording", "not JSON lines"]),
        (["up", "-f", "{bin}"], ["not UTF-8"]),
        (["up", "-f", "{yaml}"], ["bad.yaml", "not valid YAML at line"]),
        (["status", "--state-dir", "{state}"], ["state.json", "not JSON"]),
        (["status", "--state-dir", "{missing}"], ["no cluster"]),
        (["replicas", "ls", "--state-dir", "{missing}"], ["no cluster"]),
        (["train", "--data", "{bin}", "--out", "m"], ["--data", "Parquet"]),
        (["sim", "check", "{bin}"], ["binary.dat"]),
        (["balancer", "--model", "{bin}", "--port", "0"], ["--model", "not a valid ONNX model"]),
        (["balancer", "--policy", "oracle", "--oracle-truth", "{bin}", "--model", "heuristic",
          "--port", "0"], ["--oracle-truth", "not valid JSON"]),
        # An --out that cannot be written is found before the run, not after it.
        (["load", "--url", "http://127.0.0.1:9", "--out", "{bin}/r.json"],
         ["--out", "is not a directory"]),
        (["demo", "--out", "{bin}/demo"], ["--out", "is not a directory"]),
        (["collect", "--out", "{bin}/rows.parquet"], ["--out", "is not a directory"]),
        (["sim", "--output", "{bin}/run.json"], ["--output", "is not a directory"]),
    ],
)  # fmt: skip
def test_a_file_that_cannot_be_used_is_named(
    tmp_path: Path, binary: Path, args: list[str], words: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text("spec: [unclosed\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_bytes(BINARY)
    journal = _steady_state_failed(tmp_path / "j.json")
    paths = {"bin": binary, "yaml": tmp_path / "bad.yaml", "state": state, "j": journal,
             "missing": tmp_path / "missing"}  # fmt: skip
    done = run(*(a.format(**paths) for a in args), cwd=tmp_path)
    one_line(done, 2, *words)


# ---- flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["balancer", "--bogus"], ["No such option", "--bogus", "twlb balancer --help"]),
        (["bogus"], ["No such command", "bogus"]),
        (["up", "-f", "x.yaml", "--policy", "fastest"], ["--policy", "round-robin", "trust"]),
        (["up", "-f", "x.yaml", "--model", "/nope.onnx"], ["--model", "/nope.onnx"]),
        (["demo", "--model", "/nope.onnx"], ["--model", "does not exist"]),
        (["load", "--url", "ftp://x"], ["--url", "http://"]),
        (["load", "--url", "http://127.0.0.1:9", "--breaker-window-type", "sliding"],
         ["--breaker-window-type", "count", "time"]),
        (["collect", "--out", "o.parquet", "--window", "0.3"], ["--window", "trust tick"]),
        (["sim", "--bug", "nonsense", "--duration", "1"], ["nonsense", "double-vote"]),
        (["operator", "--liveness", "notaurl"], ["--liveness", "http://HOST:PORT/PATH"]),
        (["chaos", "check"], ["Missing argument", "JOURNALS"]),
    ],
)  # fmt: skip
def test_a_bad_flag_is_one_line_naming_it(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    one_line(run(*args, cwd=tmp_path), 2, *words)


def test_an_unreachable_load_target_is_one_line_after_the_report(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = run("load", "--url", url, "--duration", "1", "--out", "r.json", "--quiet", cwd=tmp_path)
    one_line(done, 2, "unreachable", url)
    assert json.loads((tmp_path / "r.json").read_text())["unreachable"] is True


# ---- every enumerated option lists its choices -----------------------------------------


def test_every_policy_and_model_option_lists_its_choices() -> None:
    policies = {p.value for p in PolicyName}
    found = {"policy": 0, "model": 0}
    for path, param in twlb_params():
        if param.name in ("policy", "policies") and path != "twlb sim lb":
            assert isinstance(param.type, click.Choice), path
            assert set(param.type.choices) <= policies, path
            found["policy"] += 1
        elif param.name == "model" and path != "twlb sim check":
            assert isinstance(param.type, ModelChoice), path
            assert param.make_metavar(click.Context(click.Command(path))) == (
                "[shipped|heuristic|FILE]"
            )
            found["model"] += 1
    # balancer, envoy, up, demo, bench: policy; balancer, envoy, up, demo, bench: model
    assert found == {"policy": 5, "model": 5}
