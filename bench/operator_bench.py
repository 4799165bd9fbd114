"""Benchmark the TrustCluster operator against kmock's Kubernetes API emulator.

Two figures, each with the real kopf operator and the real handlers over HTTP:
  * one 50-node TrustCluster: seconds from creation until every child exists and the
    status has observed the generation (target: within 2 s);
  * 100 TrustClusters created at once: seconds until all are reconciled, and the number
    of handler errors logged (target: within 30 s, none).

Prints the figures and writes reports/bench/operator_bench.json.
Run: .venv/bin/python bench/operator_bench.py [--out reports/bench/operator_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from twlb.operator.handlers import OperatorConfig
from twlb.processes.managed import ManagedProcess, free_port

#: The kmock harness is a test helper (tests/kube_harness.py), not part of the package.
HARNESS = Path(__file__).resolve().parent.parent / "tests" / "kube_harness.py"
sys.path.insert(0, str(HARNESS.parent))
from kube_harness import kubeconfig_for, running_operator, trustcluster  # noqa: E402

NS = "bench"
BIG_NODES = 50
MANY = 100
BIG_TARGET_S = 2.0
MANY_TARGET_S = 30.0
TC_PATH = f"/apis/twlb.dev/v1alpha1/namespaces/{NS}/trustclusters"


class ErrorCounter(logging.Handler):
    """Counts what kopf and the operator log at ERROR or above (handler failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])


class Api:
    """What the benchmark asks the emulator, over HTTP like kubectl would."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.clusters: dict[str, dict[str, Any]] = {}

    async def create(self, name: str, spec: dict[str, Any]) -> None:
        r = await self.client.post(TC_PATH, json=trustcluster(name, NS, spec))
        r.raise_for_status()

    async def refresh(self) -> None:
        r = await self.client.get(TC_PATH)
        r.raise_for_status()
        self.clusters = {o["metadata"]["name"]: o for o in r.json()["items"]}

    def reconciled(self, name: str) -> bool:
        obj = self.clusters.get(name) or {}
        generation = obj.get("metadata", {}).get("generation", -1)
        return (obj.get("status") or {}).get("observedGeneration") == generation

    async def names(self, group_version: str, plural: str) -> set[str]:
        prefix = "/api" if group_version == "v1" else "/apis"
        r = await self.client.get(f"{prefix}/{group_version}/namespaces/{NS}/{plural}")
        r.raise_for_status()
        return {o["metadata"]["name"] for o in r.json()["items"]}

    async def fully_rendered(self, name: str, nodes: int) -> bool:
        wanted = {f"{name}-node-{i}" for i in range(nodes)} | {f"{name}-balancer"}
        return wanted <= await self.names("apps/v1", "deployments") and wanted <= (
            await self.names("v1", "services")
        )


async def _until_reconciled(api: Api, names: list[str], timeout: float, poll: float) -> None:
    async def poll_once() -> bool:
        await api.refresh()
        return all(api.reconciled(n) for n in names)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await poll_once():
        if loop.time() > deadline:
            return
        await asyncio.sleep(poll)


async def bench_big_cluster(api: Api) -> dict[str, Any]:
    spec = {
        "backends": BIG_NODES,
        "seed": 11,
        "faultMix": [
            {"type": "delay", "count": 5},
            {"type": "error", "count": 5},
            {"type": "byzantine", "count": 5},
        ],
    }
    start = time.perf_counter()
    await api.create("big", spec)
    # The status observes the generation only after every child was created.
    await _until_reconciled(api, ["big"], timeout=60, poll=0.02)
    seconds = time.perf_counter() - start
    rendered = await api.fully_rendered("big", BIG_NODES)
    return {
        "nodes": BIG_NODES,
        "objects": 2 * BIG_NODES + 6,
        "seconds_to_fully_rendered": round(seconds, 3),
        "fully_rendered": rendered,
        "target_s": BIG_TARGET_S,
        "met": rendered and seconds <= BIG_TARGET_S,
    }


async def bench_many_clusters(api: Api) -> dict[str, Any]:
    names = [f"tc-{i:03d}" for i in range(MANY)]
    start = time.perf_counter()
    await asyncio.gather(
        *(
            api.create(n, {"backends": 3, "seed": i, "faultMix": [{"type": "error", "count": 1}]})
            for i, n in enumerate(names)
        )
    )
    created = time.perf_counter() - start
    await _until_reconciled(api, names, timeout=120, poll=0.1)
    seconds = time.perf_counter() - start
    reconciled = sum(1 for n in names if api.reconciled(n))
    deployments = await api.names("apps/v1", "deployments")
    rendered = sum(
        1 for n in names if {f"{n}-node-{i}" for i in range(3)} | {f"{n}-balancer"} <= deployments
    )
    return {
        "clusters": MANY,
        "nodes_each": 3,
        "seconds_to_create_all": round(created, 3),
        "seconds_to_all_reconciled": round(seconds, 3),
        "reconciled": reconciled,
        "fully_rendered": rendered,
        "target_s": MANY_TARGET_S,
        "met": seconds <= MANY_TARGET_S and reconciled == rendered == MANY,
    }


async def run() -> dict[str, Any]:
    errors = ErrorCounter()
    logging.getLogger().addHandler(errors)
    logging.getLogger().setLevel(logging.WARNING)
    config = OperatorConfig()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The API server runs in its own process, as it would; the operator runs here.
    emulator = ManagedProcess([sys.executable, str(HARNESS), "--port", str(port)]).start()
    try:
        emulator.wait_ready(url + "/version", timeout=60)
        limits = httpx.Limits(max_connections=10)
        with kubeconfig_for(url):
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
                api = Api(client)
                async with running_operator([NS], config):
                    big = await bench_big_cluster(api)
                    many = await bench_many_clusters(api)
    finally:
        emulator.stop()
    many["handler_errors"] = len(errors.messages)
    many["met"] = many["met"] and not errors.messages
    return {
        "benchmark": "operator",
        "api": "kmock KubernetesEmulator in a child process (loopback HTTP)",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "operator": {
            "handler_workers": config.handler_workers,
            "api_workers": config.api_workers,
            "status_interval_s": config.status_interval_s,
        },
        "big_cluster": big,
        "many_clusters": many,
        "errors": errors.messages[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/bench/operator_bench.json"))
    args = parser.parse_args()
    report = asyncio.run(run())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    big, many = report["big_cluster"], report["many_clusters"]
    print(
        f"50-node TrustCluster fully rendered in {big['seconds_to_fully_rendered']:.3f} s "
        f"(target {big['target_s']} s: {'met' if big['met'] else 'MISSED'})"
    )
    print(
        f"100 TrustClusters reconciled in {many['seconds_to_all_reconciled']:.3f} s, "
        f"{many['fully_rendered']}/100 fully rendered, {many['handler_errors']} handler errors "
        f"(target {many['target_s']} s, no errors: {'met' if many['met'] else 'MISSED'})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
