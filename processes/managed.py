"""Start `twlb` services as child processes, wait until they answer, stop them by id.

Used by the embedded runtime, the benchmarks and the tests, so that every process
started is tracked by its pid and stopped (SIGTERM, then SIGKILL) by whoever started it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

#: Lowest port `free_port` hands out (below it: well-known and registered services).
LOWEST_PORT = 10_000

_handed_out: set[int] = set()  # ports this process gave a service to start on
_draw = random.Random()


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of source ports for outbound connections (Linux's default
    where it cannot be read)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(x) for x in text.split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago, for a service started next.

    Drawn outside the kernel's ephemeral range: between this call and the service's bind,
    any outbound connection on the machine may take an ephemeral port as its source (a
    test suite's balancer once lost its port so, "address already in use"). And never
    the same port twice from one process, so services started together do not collide.
    """
    low, high = ephemeral_ports()
    spans = [(LOWEST_PORT, low - 1 - 64), (high + 1, 65535 - 64)]  # room for free_port_range
    spans = [(a, b) for a, b in spans if b - a >= 1000]
    for _ in range(200 if spans else 0):
        a, b = _draw.choice(spans)
        port = _draw.randint(a, b)
        if port not in _handed_out and not port_in_use(port, host):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room outside it
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on host:port (or the port cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port_range(n: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first of `n` consecutive ports that were all free on `host` a moment ago."""
    for _ in range(tries):
        base = free_port(host)
        ports = range(base, base + n)
        if base + n < 65000 and not any(
            p in _handed_out - {base} or port_in_use(p, host) for p in ports
        ):
            _handed_out.update(ports)
            return base
    raise OSError(f"found no {n} consecutive free ports on {host}")


def twlb_argv(*args: str) -> list[str]:
    """argv that runs the `twlb` command with this interpreter."""
    # -P: never put the working directory on sys.path (a checkout's top-level operator/
    # folder would shadow the standard library's `operator`).
    return [sys.executable, "-P", "-m", "twlb", *args]


@dataclass
class ManagedProcess:
    """A child process we started, stopped only through its own pid."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    log_path: Path | None = None
    #: Descriptors the child inherits under the same numbers (a listening socket).
    pass_fds: Sequence[int] = ()
    popen: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=tuple(self.pass_fds),
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, "process not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        """Poll `url` until it answers 2xx; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{' '.join(self.argv)} exited with status {self.returncode()} before {url} answered"
                    + self._log_tail()
                )
            try:
                r = httpx.get(url, timeout=1.0)
                if r.status_code < 300:
                    return
                last = r.status_code
            except httpx.HTTPError as err:
                last = err
            time.sleep(0.05)
        raise TimeoutError(
            f"{url} did not answer within {timeout}s (last: {last})" + self._log_tail()
        )

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return "\n--- log tail ---\n" + self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM this pid (and its session), then SIGKILL after `timeout`; returns status."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout)
        # Reap anything left in its session (children of the child).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        return p.returncode

    def kill(self) -> None:
        """SIGKILL at once, as a chaos experiment or a crash would."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError):
        return False
