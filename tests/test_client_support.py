"""A shared backend for the client and load tests: one real `twlb backend` per module,
its fault switched per test through the token-protected control endpoint (starting a
node costs seconds on a busy 2-core machine; switching its fault costs milliseconds)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

CONTROL_TOKEN = "test-control-token"


@dataclass
class ControlledNode:
    """A running backend and a way to change its fault."""

    url: str
    process: ManagedProcess

    def set_fault(self, **fault: object) -> None:
        """PUT /control/fault (fields not given take their defaults; type benign heals)."""
        r = httpx.put(
            f"{self.url}/control/fault",
            json=fault,
            headers={"Authorization": f"Bearer {CONTROL_TOKEN}"},
            timeout=10.0,
            trust_env=False,
        )
        assert r.status_code == 200, r.text

    def requests_served(self) -> float:
        """All /work requests this node has answered so far (from its own metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10.0, trust_env=False).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "twlb_node_requests_total"
        )


def start_node(log_dir: Path, *args: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess(
        twlb_argv(
            "backend",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-simulation",
            "--log-level",
            "warning",
            "--control-token",
            CONTROL_TOKEN,
            *args,
        ),
        log_path=log_dir / f"backend-{port}.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/healthz", timeout=30.0)
    except BaseException:
        proc.stop()
        raise
    return proc, url


@pytest.fixture(scope="module", name="node")
def node_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlledNode]:
    """One benign backend for the module; each test sets the fault it needs."""
    proc, url = start_node(tmp_path_factory.mktemp("node"))
    try:
        yield ControlledNode(url, proc)
    finally:
        proc.stop()
        assert not pid_alive(proc.pid), f"backend {proc.pid} outlived its tests"
