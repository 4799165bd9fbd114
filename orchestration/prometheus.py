"""The one way a Prometheus server is started on loopback, and reads through its HTTP API.

`LocalPrometheus` starts Debian's `prometheus` binary as a child process with a generated
config scraping the balancers (and, for the embedded runtime, the backend nodes); the
embedded runtime (`twlb up`) and the collector (`twlb collect`) both start it this way.
`PrometheusAPI` talks to that server or to an in-cluster Prometheus: the collector reads
the balancer's feature windows back with PromQL.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from twlb.processes.managed import ManagedProcess, free_port


class PrometheusUnavailable(RuntimeError):
    """The prometheus binary is missing or the server does not answer."""


def find_prometheus(binary: str = "prometheus") -> str:
    """Path of the prometheus executable, or a clear error saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise PrometheusUnavailable(
            f"the '{binary}' executable is not on PATH: run scripts/system-deps (it installs "
            "Debian's prometheus package) or pass the binary's path"
        )
    return path


def render_config(
    targets: Sequence[str],
    scrape_interval_s: float,
    nodes: Sequence[str] = (),
    envoys: Sequence[str] = (),
) -> dict[str, Any]:
    """A Prometheus config scraping each balancer base URL's /metrics (job twlb-balancer),
    each backend node's (job twlb-nodes) and each Envoy's /stats/prometheus (job envoy, a
    data plane TW-LB steers) at the given interval."""
    interval = f"{round(scrape_interval_s * 1000)}ms"

    def job(
        name: str, urls: Sequence[str], label: str | None, path: str = "/metrics"
    ) -> dict[str, Any]:
        # Nodes get no target label: their own metrics already carry a `node` label.
        static = [{"targets": [_netloc(u)], "labels": {label: u} if label else {}} for u in urls]
        return {
            "job_name": name,
            "metrics_path": path,
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "static_configs": static,
        }

    jobs = [job("twlb-balancer", targets, "balancer")]
    if nodes:
        jobs.append(job("twlb-nodes", nodes, None))
    if envoys:
        jobs.append(job("envoy", envoys, "envoy", "/stats/prometheus"))
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def _netloc(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"scrape target must be an http(s) base URL, got {url!r}")
    return parts.netloc


@dataclass
class PrometheusAPI:
    """Read-only client of a Prometheus server's HTTP API (instant and range queries)."""

    base_url: str
    timeout_s: float = 10.0

    def _get(self, path: str, params: dict[str, str]) -> Any:
        try:
            r = httpx.get(self.base_url.rstrip("/") + path, params=params, timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise PrometheusUnavailable(f"{self.base_url}: {err}") from err
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or body.get("status") != "success":
            raise PrometheusUnavailable(
                f"{self.base_url}{path} answered {r.status_code}: {body.get('error', r.text[:200])}"
            )
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)["result"]

    def query_range(
        self, promql: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """Range matrix: [{"metric": {...}, "values": [[ts, "v"], ...]}, ...]."""
        params = {
            "query": promql,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s:.3f}",
        }
        return self._get("/api/v1/query_range", params)["result"]

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        """Label sets of the series matching `match` in [start, end]."""
        params = {"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        return self._get("/api/v1/series", params)

    def targets_up(self) -> bool:
        """True once every active scrape target has been scraped successfully."""
        active = self._get("/api/v1/targets", {"state": "active"})["activeTargets"]
        return bool(active) and all(t.get("health") == "up" for t in active)


@dataclass
class LocalPrometheus:
    """Debian's prometheus on a loopback port, scraping the given balancers (and nodes).

    `port` None picks a free one; `workdir` None is a temporary directory removed on stop.
    """

    targets: Sequence[str]
    scrape_interval_s: float = 0.5
    binary: str = "prometheus"
    workdir: Path | None = None
    port: int | None = None
    nodes: Sequence[str] = ()
    envoys: Sequence[str] = ()  # Envoy stats addresses, scraped at /stats/prometheus
    retention: str = "1d"
    process: ManagedProcess | None = field(default=None, init=False)
    url: str = field(default="", init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        exe = find_prometheus(self.binary)
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="twlb-prometheus-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = ManagedProcess(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--storage.tsdb.retention.time={self.retention}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            log_path=self.workdir / "prometheus.log",
        ).start()
        try:
            self.process.wait_ready(self.url + "/-/ready", timeout=timeout_s)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def _write_config(self) -> Path:
        assert self.workdir is not None
        config = self.workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                render_config(self.targets, self.scrape_interval_s, self.nodes, self.envoys)
            )
        )
        return config

    def set_nodes(self, nodes: Sequence[str]) -> None:
        """Scrape these backend nodes from now on (replicas added or removed at run time):
        the config is rewritten and the running server re-reads it on SIGHUP."""
        self.nodes = list(nodes)
        if self.process is not None and self.process.alive():
            self._write_config()
            os.kill(self.process.pid, signal.SIGHUP)

    @property
    def api(self) -> PrometheusAPI:
        return PrometheusAPI(self.url)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
