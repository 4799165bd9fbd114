"""Shared fixtures: real `twlb` processes on loopback, each stopped by its pid."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

Spawn = Callable[..., tuple[ManagedProcess, str]]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy (returned), failing the test
    with `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def twlb_params() -> Iterator[tuple[str, click.Parameter]]:
    """Every parameter of every `twlb` subcommand (nested groups included), with the path
    of its command ("twlb chaos check")."""
    from twlb.cli import main

    ctx = click.Context(main)
    stack: list[tuple[str, click.Command]] = [("twlb", main)]
    while stack:
        path, cmd = stack.pop()
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None:
                    stack.append((f"{path} {name}", sub))
        for param in cmd.params:
            yield path, param


def twlb_status(state_dir: Path) -> dict:
    """`twlb status --state-dir DIR -o json` as the user runs it, parsed."""
    out = subprocess.run(
        twlb_argv("status", "--state-dir", str(state_dir), "-o", "json"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `twlb <service> --host 127.0.0.1 --port P ...`, wait for `ready_path`.

    Returns (process, base_url). Every process is stopped at teardown and checked gone.
    """
    started: list[ManagedProcess] = []

    def _spawn(
        service: str,
        *args: str,
        env: dict[str, str] | None = None,
        ready_path: str = "/healthz",
        wait: bool = True,
        timeout: float = 20.0,
    ) -> tuple[ManagedProcess, str]:
        port = free_port()
        log = tmp_path / f"{service}-{port}.log"
        proc = ManagedProcess(
            twlb_argv(service, "--host", "127.0.0.1", "--port", str(port), *args),
            env=env,
            log_path=log,
        ).start()
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        if wait:
            proc.wait_ready(url + ready_path, timeout=timeout)
        return proc, url

    yield _spawn
    for proc in started:
        proc.stop()
    for proc in started:
        assert not pid_alive(proc.pid), f"process {proc.pid} outlived its test"


@pytest.fixture
async def cluster() -> AsyncIterator[Any]:
    """An emulated Kubernetes API server (kmock) for one test, KUBECONFIG pointing at it.
    (Imported here, not at the top: only the Kubernetes tests need kmock and kopf.)"""
    from kube_harness import emulated_cluster

    async with emulated_cluster() as c:
        yield c
