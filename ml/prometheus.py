"""A real Prometheus server run as a child process, and reads through its HTTP API.

The collector uses it to record the balancer's feature windows the way a cluster does:
Prometheus scrapes the balancer's /metrics, and the windows are read back with PromQL.
`LocalPrometheus` starts Debian's `prometheus` binary with a generated config on
loopback; `PrometheusAPI` talks to that one or to an in-cluster Prometheus.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from twlb.procs import ManagedProcess, free_port


class PrometheusUnavailable(RuntimeError):
    """The prometheus binary is missing or the server does not answer."""


def find_prometheus(binary: str = "prometheus") -> str:
    """Path of the prometheus executable, or a clear error saying how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise PrometheusUnavailable(
            f"the '{binary}' executable is not on PATH: install Debian's package "
            "(apt-get install prometheus) or pass the binary's path"
        )
    return path


def render_config(targets: Sequence[str], scrape_interval_s: float) -> dict[str, Any]:
    """A Prometheus config scraping each balancer base URL's /metrics at a short interval."""
    static = []
    for url in targets:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"scrape target must be an http(s) base URL, got {url!r}")
        static.append({"targets": [parts.netloc], "labels": {"balancer": url}})
    interval = f"{round(scrape_interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "twlb-balancer",
                "metrics_path": "/metrics",
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": static,
            }
        ],
    }


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
    """Debian's prometheus on a free loopback port, scraping the given balancers."""

    targets: Sequence[str]
    scrape_interval_s: float = 0.5
    binary: str = "prometheus"
    workdir: Path | None = None
    process: ManagedProcess | None = field(default=None, init=False)
    url: str = field(default="", init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        exe = find_prometheus(self.binary)
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="twlb-prometheus-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(render_config(self.targets, self.scrape_interval_s)))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = ManagedProcess(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
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
