"""How processes log, and tokens that stay off the command line (twlb.logs, twlb.tokens).

- A record's structured fields are fields of the line: `key=value` after the message in
  text, members of the object in JSON (python-json-logger), never JSON pasted into text.
- `twlb --log-format json backend ...` logs JSON lines, every one of which parses; the
  backend takes its control token from `--control-token-file`, re-read when it changes;
  a token file that cannot be used stops the start in one line, exit status 2.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

from twlb.logs import FIELDS, setup_logging
from twlb.tokens import write_token_file


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _log(stream: io.StringIO, fmt: str) -> list[str]:
    setup_logging("info", fmt, stream)
    log = logging.getLogger("twlb.test")
    log.warning("ejected %s", "b1", extra={"backend": "b1", "event": {"reason": "liar x"}})
    log.info("GET /work 200", extra={FIELDS: {"status": 200, "path": "/a b", "odd": None}})
    log.debug("not at info")
    return stream.getvalue().splitlines()


def test_text_lines_carry_the_fields_after_the_message(stream: io.StringIO) -> None:
    first, second = _log(stream, "text")
    assert first.endswith('WARNING twlb.test: ejected b1 backend=b1 event.reason="liar x"')
    assert second.endswith('INFO twlb.test: GET /work 200 status=200 path="/a b" odd=-')
    assert "{" not in first + second  # no JSON pasted into text


def test_json_lines_carry_the_fields_as_members(stream: io.StringIO) -> None:
    first, second = (json.loads(line) for line in _log(stream, "json"))
    assert first["level"] == "WARNING" and first["logger"] == "twlb.test"
    assert first["message"] == "ejected b1" and first["backend"] == "b1"
    assert first["event"] == {"reason": "liar x"}
    assert first["time"].endswith("+00:00")  # wall clock, UTC
    assert second["status"] == 200 and second["path"] == "/a b" and second["odd"] is None


def test_a_backend_logs_json_and_reads_its_control_token_from_a_file(tmp_path: Path) -> None:
    secret = write_token_file(tmp_path / "control-token", "first-token")
    port = free_port()
    log = tmp_path / "node.log"
    proc = ManagedProcess(
        twlb_argv("--log-format", "json", "backend", "--host", "127.0.0.1", "--port",
                  str(port), "--no-simulation", "--control-token-file", str(secret)),
        log_path=log,
    ).start()  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/healthz", timeout=90)
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
        assert "first-token" not in ps.stdout

        def fault(token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.get(url + "/control/fault", headers=headers, timeout=5).status_code

        assert fault("first-token") == 200 and fault("other") == 401
        write_token_file(secret, "second-token")  # a rotated Secret: no restart
        assert fault("second-token") == 200 and fault("first-token") == 401
        assert httpx.get(url + "/work", params={"key": "k"}, timeout=5).status_code == 200
    finally:
        proc.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # every line, the web server's included
        assert {"time", "level", "logger", "message"} <= set(record), record


@pytest.mark.parametrize(("content", "complaint"), [("", "is empty"), (None, "cannot read")])
def test_an_unusable_token_file_stops_the_start_in_one_line(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    for argv in (
        twlb_argv("backend", "--port", str(free_port()), "--control-token-file", str(path)),
        twlb_argv("balancer", "--port", str(free_port()), "--model", "heuristic",
                  "--backend", "http://127.0.0.1:1", "--admin-token-file", str(path)),
    ):  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.count("\n") == 1 and complaint in out.stderr, out.stderr
        assert str(path) in out.stderr
