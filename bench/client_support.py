"""What the client benchmarks share: starting backends, running `twlb load`, measuring CPU.

Every process is started through `twlb.processes.managed.ManagedProcess` and stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

REPORT_DIR = Path("reports/bench")


def start_service(
    service: str, *args: str, port: int | None = None, log_dir: Path, ready: str = "/healthz"
) -> tuple[ManagedProcess, str]:
    """`twlb SERVICE --host 127.0.0.1 --port P ARGS`, waited for until `ready` answers."""
    port = port or free_port()
    proc = ManagedProcess(
        twlb_argv(service, "--host", "127.0.0.1", "--port", str(port), *args),
        log_path=log_dir / f"{service}-{port}.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + ready, timeout=60.0)
    except BaseException:
        proc.stop()
        raise
    return proc, url


def _tree_cpu_s(p: psutil.Process) -> float:
    """CPU seconds of a process, its live children and its reaped children."""
    t = p.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in p.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class LoadRun:
    """A finished `twlb load` run: its report, exit status and the CPU it used."""

    report: dict[str, Any]
    exit_status: int
    cpu_s: float
    wall_s: float


class LoadProcess:
    """`twlb load ... --out FILE` as a child process, watched for CPU while it runs."""

    def __init__(self, args: list[str], log_dir: Path) -> None:
        self._out = Path(tempfile.mkstemp(suffix=".json", dir=log_dir)[1])
        self._proc = ManagedProcess(
            twlb_argv("load", *args, "--quiet", "--out", str(self._out)),
            log_path=log_dir / "load.log",
        )
        self._started = 0.0
        self._cpu_s = 0.0

    def start(self) -> LoadProcess:
        self._proc.start()
        self._started = time.monotonic()
        return self

    def sample(self) -> None:
        """Record the CPU used so far (call now and then; the last sample before exit counts)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self._cpu_s = max(self._cpu_s, _tree_cpu_s(psutil.Process(self._proc.pid)))

    def alive(self) -> bool:
        return self._proc.alive()

    def wait(self, timeout: float) -> LoadRun:
        bound = time.monotonic() + timeout
        try:
            while self._proc.alive():
                if time.monotonic() > bound:
                    raise TimeoutError(f"twlb load did not finish within {timeout:.0f}s")
                self.sample()
                time.sleep(0.25)
        finally:
            status = self._proc.stop()
        wall = time.monotonic() - self._started
        if not self._out.exists() or self._out.stat().st_size == 0:
            log = (self._out.parent / "load.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"twlb load wrote no report (status {status}):\n{log}")
        return LoadRun(json.loads(self._out.read_text()), status or 0, self._cpu_s, wall)


def machine() -> dict[str, Any]:
    """What the figures were measured on (other load on the machine matters on 2 cores)."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
