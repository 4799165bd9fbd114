"""`twlb hashing`: the load-distribution analyses, on the real balancer and real backends.

The baseline design's four analyses (docs/hashing.md), run on the embedded runtime (the real `twlb balancer`
with its consistent-hash policy over real `twlb backend` processes, 10,000 async
requests each), plus measurements of the sans-IO hashing cores:

- A-1: 10,000 requests over N = 3, requests per server (bar chart).
- A-2: N from 2 to 6 (replicas added at run time), load per server (line chart).
- A-3: a replica killed in the `replace` failure mode: failure, detection, replacement
  serving, with our heartbeats and with the baseline's (10 s checks, 5 s timeout).
- A-4: hash functions: the baseline's quadratic slot formulas and Python's `hash()`
  on 512 slots with 9 virtual servers, against sha256 and md5 (through the balancer at 9
  and 160 virtual nodes).
- Keys moved when a backend joins or leaves, measured through the live balancer: for
  each hashing policy (consistent-hash, rendezvous, maglev, jump) and N, the balancer
  starts over N real backends, one joins and one leaves through its admin API, and every
  key is sent again after each change; the share that changed backend against 1/(N+1).
- Bounded loads on the live balancer: Zipf-hot keys from 48 concurrent clients (the
  policy's own count of placements, spills and the most a backend carried over the bound,
  in flight), and the same keys sent twice at low load.
- The sans-IO cores: load standard deviation against virtual nodes per hash family, keys
  moved for ring, jump, rendezvous and Maglev, and bounded loads (c = 1.25) on uniform
  and skewed keys.

Everything goes to `--out` (default reports/hashing): hashing.json, hashing.md and PNGs.
hashing.json and hashing.md are rewritten as each analysis finishes, so an interrupted or
failed run keeps what it measured; every cluster takes free ports (tried again on other
ports when one is taken meanwhile) unless `--port-base` fixes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import click
import httpx
from twlb.balancer.hashing import (
    HashRing,
    JumpSlots,
    MaglevTable,
    SlotRing,
    bounded_load_owner,
    rendezvous_owner,
)
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.orchestration.scaling import FailureMode, HeartbeatSettings
from twlb.processes.managed import ManagedProcess, free_port, free_port_range, twlb_argv
from twlb.processes.state import ClusterError

from twlb.options import OutputPath
from twlb.spec import API_GROUP, API_VERSION, KIND, ObjectMeta, TrustCluster, TrustClusterSpec

#: The baseline design's figures docs/hashing.md sets ours beside.
BASELINE = {
    "detection_s": [10, 15],  # a 10 s heartbeat with a 5 s timeout
    "heartbeat": {"interval_s": 10.0, "timeout_s": 5.0, "failure_threshold": 1},
    "slots": 512,
    "virtual_servers": 9,
}
VNODE_COUNTS = (1, 2, 5, 9, 20, 50, 100, 200, 500)
BALANCE_FACTOR = 1.25
#: The hashing policies whose key movement is measured through the live balancer.
MOVEMENT_POLICIES = ("consistent-hash", "rendezvous", "maglev", "jump")
#: Fleet sizes N of the live key-movement runs (one joins: N + 1; one leaves: N again).
MOVEMENT_SIZES = (3, 4, 5, 6, 8, 10)
#: Clients at once of the live bounded-loads run, and its Zipf exponent over 1,000 keys.
BOUNDED_CLIENTS = 48
ZIPF_S = 1.1
#: Times an analysis cluster is started on fresh free ports before the run gives up.
PORT_TRIES = 5


def analysis_cluster(backends: int, name: str, seed: int) -> TrustCluster:
    """Benign backends behind the consistent-hash policy, no audits (one try per request)."""
    spec = TrustClusterSpec.model_validate(
        {"backends": backends, "seed": seed, "policy": "consistent-hash",
         "balancer": {"auditFraction": 0.0}}
    )  # fmt: skip
    return TrustCluster(
        apiVersion=f"{API_GROUP}/{API_VERSION}",
        kind=KIND,
        metadata=ObjectMeta(name=name),
        spec=spec,
    )


def request_ids(count: int, seed: int) -> list[int]:
    """Random six-digit request ids, as the baseline design's clients sent."""
    rng = random.Random(f"requests:{seed}")
    return [rng.randrange(100_000, 1_000_000) for _ in range(count)]


# ---- load through the real balancer ------------------------------------------------------


def zipf_keys(count: int, distinct: int, s: float, seed: int | str) -> list[str]:
    """`count` keys drawn from `distinct` ones with Zipf weights 1 / rank^s (rank 1 hottest)."""
    rng = random.Random(f"zipf:{seed}")
    names = [f"user-{i}" for i in range(distinct)]
    return rng.choices(names, [1 / (r + 1) ** s for r in range(distinct)], k=count)


async def _drive(
    url: str, keys: Sequence[str], concurrency: int, owners: dict[str, str] | None = None
) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    it = iter(keys)
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        for key in it:
            try:
                async with session.get(url + "/work", params={"key": key}) as r:
                    if r.status == 200:
                        node = (await r.json())["node"]
                        counts[node] += 1
                        if owners is not None:
                            owners[key] = node
                    else:
                        failures[f"http {r.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as err:
                failures[type(err).__name__] += 1

    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return {
        "requests": len(keys),
        "per_server": dict(sorted(counts.items())),
        "failed": dict(failures),
        "seconds": round(seconds, 2),
        "rate": round(len(keys) / seconds, 1),
    }


def drive(
    url: str, keys: Sequence[str], concurrency: int, owners: dict[str, str] | None = None
) -> dict[str, Any]:
    """Send one GET /work per key through `url`, `concurrency` at a time (aiohttp); with
    `owners`, record the node that answered each key (the last answer of a repeated key)."""
    return asyncio.run(_drive(url, keys, concurrency, owners))


def spread(counts: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation relative to the mean, and max over mean of loads."""
    mean = statistics.fmean(counts)
    return {
        "mean": round(mean, 2),
        "cv": round(statistics.pstdev(counts) / mean, 4) if mean else 0.0,
        "max_over_mean": round(max(counts) / mean, 4) if mean else 0.0,
    }


@contextlib.contextmanager
def running(
    make: Callable[[int], EmbeddedCluster], port_base: int, offset: int, count: int
) -> Iterator[EmbeddedCluster]:
    """A cluster started by `start_cluster`, stopped (every process by its pid) at exit."""
    cluster = start_cluster(make, port_base, offset, count)
    try:
        yield cluster
    finally:
        cluster.stop()


def analysis_running(
    out: Path, name: str, backends: int, seed: int, port_base: int, offset: int, count: int,
    **options: Any,
) -> contextlib.AbstractContextManager[EmbeddedCluster]:  # fmt: skip
    """One of the analysis clusters (`analysis_cluster`), state under out/state/NAME, no
    Prometheus, running while in use (`options` go to the EmbeddedCluster)."""
    return running(
        lambda base: EmbeddedCluster(
            analysis_cluster(backends, name, seed), port_base=base,
            state_dir=out / "state" / name, prometheus=False, **options,
        ),
        port_base, offset, count,
    )  # fmt: skip


def start_cluster(
    make: Callable[[int], EmbeddedCluster], port_base: int, offset: int, count: int
) -> EmbeddedCluster:
    """Start the cluster `make(first_port)` builds: on `port_base` + `offset` when given
    (the ring hashes backend URLs, so fixed ports repeat the same loads), else on `count`
    free ports, tried again on others when one was taken meanwhile (another program may
    bind a port between the check and the start). ClusterError says why it could not."""
    tries = 1 if port_base else PORT_TRIES
    for attempt in range(1, tries + 1):
        base = port_base + offset if port_base else free_port_range(count)
        cluster = make(base)
        try:
            return cluster.start()
        except (ClusterError, RuntimeError, TimeoutError) as err:
            # start() has stopped whatever it started.
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            if attempt == tries:
                hint = "pick another --port-base" if port_base else "ports kept being taken"
                raise ClusterError(
                    f"cannot start {cluster.name} on ports {base}+: {first}; {hint}"
                ) from None
    raise AssertionError("unreachable")


def run_a1_a4(
    out: Path, requests: int, concurrency: int, seed: int, step: Callable[[str], None],
    port_base: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """A-1 (N = 3, the balancer's defaults) and A-4's live half (9 and 160 virtual nodes,
    sha256 and md5), on one cluster whose balancer restarts with each setting."""
    keys = [str(r) for r in request_ids(requests, seed)]
    live: dict[str, Any] = {}
    with analysis_running(out, "a1", 3, seed, port_base, 0, 8) as cluster:
        a1 = drive(cluster.balancer_url, keys, concurrency)
        a1 |= spread(list(a1["per_server"].values()))
        step("A-1: 10,000 requests over N=3")
        for algorithm in ("sha256", "md5"):
            for vnodes in (9, 160):
                cluster.balancer_args = ("--hash-algorithm", algorithm, "--vnodes", str(vnodes))
                cluster.restart_balancer()
                r = drive(cluster.balancer_url, keys, concurrency)
                live[f"{algorithm}/{vnodes}"] = r | spread(list(r["per_server"].values()))
                step(f"A-4: balancer with {algorithm}, {vnodes} virtual nodes")
    ints = request_ids(requests, seed)
    slots = {}
    for family in ("quadratic", "python", "sha256", "md5"):
        ring = SlotRing(family, BASELINE["slots"], BASELINE["virtual_servers"])
        ring.set_servers(range(3))
        counts = Counter(ring.owner(r) for r in ints)
        per = [counts.get(i, 0) for i in range(3)]
        slots[family] = {"per_server": per} | spread(per)
    return {"a1": a1, "a4": {"balancer": live, "slot_ring_512x9": slots}}


def run_a2(
    out: Path, requests: int, concurrency: int, seed: int, step: Callable[[str], None],
    port_base: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """A-2: N = 2..6, one replica added at run time between runs."""
    keys = [str(r) for r in request_ids(requests, seed + 1)]
    rows = []
    with analysis_running(out, "a2", 2, seed, port_base, 10, 10) as cluster:
        for n in range(2, 7):
            if n > 2:
                cluster.replicas.add(1)
            r = drive(cluster.balancer_url, keys, concurrency)
            loads = list(r["per_server"].values())
            rows.append({"n": n, **r, **spread(loads), "min": min(loads), "max": max(loads)})
            step(f"A-2: N={n}")
    return {"a2": rows}


async def _paced(url: str, rate: float, stop: threading.Event, log: list) -> None:
    """GET /work at `rate` per second until `stop`, logging (time, node or error)."""
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        i = 0
        t0 = time.time()
        tasks = set()

        async def one(key: str) -> None:
            try:
                async with session.get(url + "/work", params={"key": key}) as r:
                    node = (await r.json())["node"] if r.status == 200 else f"http {r.status}"
            except (aiohttp.ClientError, TimeoutError) as err:
                node = type(err).__name__
            log.append((time.time(), node))

        while not stop.is_set():
            i += 1
            task = asyncio.create_task(one(f"k{i}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, t0 + i / rate - time.time()))
        await asyncio.gather(*tasks)


def run_a3(
    out: Path, label: str, beat: HeartbeatSettings, seed: int, limit_s: float = 45.0,
    port_base: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """A-3: a replica SIGKILLed under load in replace mode; the timeline of its replacement."""
    log: list[tuple[float, str]] = []
    stop = threading.Event()
    with analysis_running(
        out, f"a3-{label}", 3, seed, port_base, 0, 10,
        failure_mode=FailureMode.REPLACE, heartbeat=beat,
    ) as cluster:  # fmt: skip
        cluster.start_supervisor(interval_s=0.05)
        load = threading.Thread(
            target=lambda: asyncio.run(_paced(cluster.balancer_url, 100.0, stop, log))
        )
        load.start()
        try:
            time.sleep(2.0)
            victim = cluster.nodes[0]
            killed_at = time.time()
            cluster.kill_node(victim.name)
            deadline = time.monotonic() + limit_s
            while not cluster.replacements and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(2.0)
        finally:
            stop.set()
            load.join(30)
    if not cluster.replacements:
        raise click.ClickException(f"A-3 ({label}): no replacement within {limit_s}s")
    entry = cluster.replacements[0]
    served = [t for t, node in log if node == entry["replacement"]]
    first_served = min(served) if served else None
    after = [node for t, node in log if t >= killed_at]
    failed = [n for n in after if not n.startswith("a3-")]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - killed_at, 3)

    return {
        "label": label,
        "heartbeat": {
            "interval_s": beat.interval_s,
            "timeout_s": beat.timeout_s,
            "failure_threshold": beat.failure_threshold,
        },
        "killed": entry["failed"],
        "replacement": entry["replacement"],
        "timeline_s": {
            "killed": 0.0,
            "first_failed_heartbeat": rel(entry["first_failed_heartbeat_at"]),
            "detected": rel(entry["detected_at"]),
            "replacement_registered": rel(entry["serving_at"]),
            "first_answer_from_replacement": rel(first_served),
        },
        "requests_after_kill": len(after),
        "failed_after_kill": len(failed),
        "requests_log": [(round(t - killed_at, 3), n) for t, n in log],
    }


# ---- keys moved on join and leave, through the live balancer -------------------------------


@contextlib.contextmanager
def standalone_balancer(
    policy: str, backends: Sequence[str], log_dir: Path, *extra: str, tries: int = PORT_TRIES
) -> Iterator[tuple[str, str]]:
    """A `twlb balancer` with `policy` over `backends` on a free port, no audits (one try
    per request); yields (url, admin token) and stops it by its pid at exit."""
    token = secrets.token_urlsafe(18)
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, tries + 1):
        port = free_port()
        proc = ManagedProcess(
            twlb_argv(
                "balancer", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--admin-token", token, "--audit-fraction", "0", "--model", "heuristic",
                "--log-level", "warning", *extra,
                *(arg for b in backends for arg in ("--backend", b)),
            ),
            log_path=log_dir / f"balancer-{policy}-{port}.log",
        ).start()  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_ready(url + "/healthz", timeout=30)
        except (RuntimeError, TimeoutError) as err:  # e.g. its port was taken meanwhile
            proc.stop()
            if attempt == tries:
                raise ClusterError(f"the {policy} balancer did not start: {err}") from None
            continue
        try:
            yield url, token
        finally:
            proc.stop()
        return


def admin_change(url: str, token: str, change: str, backend: str) -> None:
    """Add (`change` 'add') or remove ('remove') one backend through the admin API."""
    headers = {"Authorization": f"Bearer {token}"}
    if change == "add":
        r = httpx.post(url + "/admin/backends", json={"url": backend}, headers=headers, timeout=10)
    else:
        r = httpx.delete(
            url + "/admin/backends", params={"url": backend}, headers=headers, timeout=10
        )
    if r.status_code not in (200, 201):
        raise ClusterError(f"the balancer refused to {change} {backend}: {r.status_code} {r.text}")


def moved_share(before: dict[str, str], after: dict[str, str]) -> tuple[float, int]:
    """The share of keys answered in both passes that changed node, and how many that is."""
    both = [k for k in before if k in after]
    moved = sum(before[k] != after[k] for k in both)
    return (moved / len(both) if both else 0.0), len(both)


def movement_through_balancer(
    policy: str,
    initial: Sequence[str],
    changes: Sequence[tuple[str, str]],
    keys: Sequence[str],
    concurrency: int,
    log_dir: Path,
    repeat_first: bool = False,
) -> dict[str, Any]:
    """Keys moved by each change of the fleet, measured through a live balancer.

    The balancer starts with `policy` over `initial`; every key is sent, then after each
    change (('add' | 'remove', backend URL), through the admin API) every key is sent
    again, and the share of keys answered by another node than before is counted against
    the ideal: 1/(N after) for a join, 1/(N before) for a leave. `repeat_first` sends the
    keys twice before any change: the share moved with no change is the run's noise (a
    request retried elsewhere after a dropped packet answers from another node).
    """
    with standalone_balancer(policy, initial, log_dir) as (url, token):
        first: dict[str, str] = {}
        r = drive(url, keys, concurrency, first)
        out: dict[str, Any] = {"policy": policy, "n": len(initial), "keys": len(keys)}
        failed = sum(r["failed"].values())
        if repeat_first:
            again: dict[str, str] = {}
            failed += sum(drive(url, keys, concurrency, again)["failed"].values())
            out["moved_without_change"] = round(moved_share(first, again)[0], 4)
        members = list(initial)
        steps = []
        before = first
        for change, backend in changes:
            n_before = len(members)
            admin_change(url, token, change, backend)
            if change == "add":
                members.append(backend)
            else:
                members.remove(backend)
            after: dict[str, str] = {}
            failed += sum(drive(url, keys, concurrency, after)["failed"].values())
            share, counted = moved_share(before, after)
            ideal = 1 / len(members) if change == "add" else 1 / n_before
            steps.append(
                {
                    "change": change,
                    "backend": backend,
                    "n_before": n_before,
                    "n_after": len(members),
                    "moved": round(share, 4),
                    "ideal": round(ideal, 4),
                    "keys_counted": counted,
                }
            )
            before = after
        out["steps"] = steps
        out["failed"] = failed
        return out


def run_movement(
    out: Path, keys: int, concurrency: int, seed: int, step: Callable[[str], None],
    port_base: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """For each hashing policy and N in MOVEMENT_SIZES: N backends, one joins (N + 1), one
    of the first N leaves (N again, the middle one: not the newest, which jump would lose
    at the end anyway). On one fleet of real backends; each run starts its own balancer."""
    names = [f"move-{seed}-{i}" for i in range(keys)]
    pool = max(MOVEMENT_SIZES) + 1
    rows = []
    with analysis_running(out, "mv", pool, seed, port_base, 40, pool + 2) as cluster:
        urls = [n.url for n in cluster.nodes]
        for policy in MOVEMENT_POLICIES:
            for n in MOVEMENT_SIZES:
                changes = [("add", urls[n]), ("remove", urls[n // 2])]
                run = movement_through_balancer(
                    policy, urls[:n], changes, names, concurrency, out / "state" / "mv" / "logs",
                    repeat_first=n == 5,
                )  # fmt: skip
                rows.append(run)
            step(f"keys moved through the balancer: {policy}")
    return rows


# ---- bounded loads on the live balancer ------------------------------------------------------


def trust_rows(url: str) -> list[dict[str, Any]]:
    r = httpx.get(url + "/trust", timeout=10)
    r.raise_for_status()
    return r.json()["backends"]


def run_bounded_live(
    out: Path, requests: int, seed: int, step: Callable[[str], None], port_base: int = 0
) -> dict[str, Any]:  # fmt: skip
    """Bounded loads (c = 1.25) on 5 real backends: Zipf-hot keys from BOUNDED_CLIENTS
    concurrent clients (what the policy counted: placements, spills, the most a backend
    carried over the bound; requests in flight left once all answered), against the plain
    ring on the same keys; then the same keys sent twice, at low load (one client) and
    under that concurrency, and the share that landed on the same backend both times."""
    hot = zipf_keys(requests, 1000, ZIPF_S, seed)
    again = zipf_keys(2000, 1000, ZIPF_S, f"{seed}:twice")
    result: dict[str, Any] = {
        "balance_factor": BALANCE_FACTOR,
        "clients": BOUNDED_CLIENTS,
        "zipf_s": ZIPF_S,
        "requests": requests,
    }
    with analysis_running(out, "bl", 5, seed, port_base, 60, 8) as cluster:
        urls = [n.url for n in cluster.nodes]
        names = {n.url: n.name for n in cluster.nodes}
        logs = out / "state" / "bl" / "logs"
        args = ("--balance-factor", str(BALANCE_FACTOR))
        ring = HashRing(160)
        ring.set_nodes(urls)
        plain = Counter(names[ring.owner(k)] for k in hot)  # type: ignore[index]
        with standalone_balancer("bounded-load", urls, logs, *args) as (url, _):
            r = drive(url, hot, BOUNDED_CLIENTS)
            rows = trust_rows(url)
        policy = rows[0]["policy"]
        result["hot"] = {
            "per_server": r["per_server"],
            "failed": r["failed"],
            "rate": r["rate"],
            "bounded_max_over_mean": spread(list(r["per_server"].values()))["max_over_mean"],
            "ring_max_over_mean": spread([plain.get(n, 0) for n in names.values()])[
                "max_over_mean"
            ],
            "placements": policy["placements"],
            "spills": policy["spills"],
            "spill_share": round(policy["spills"] / max(1, policy["placements"]), 4),
            "worst_load_over_bound": policy["worst_load_over_bound"],
            "in_flight_after": sum(row["inflight"] for row in rows),
        }
        step("bounded loads: Zipf keys, 48 clients")
        twice: dict[str, Any] = {}
        for label, clients in (
            ("low load (1 client)", 1),
            (f"{BOUNDED_CLIENTS} clients", BOUNDED_CLIENTS),
        ):
            with standalone_balancer("bounded-load", urls, logs, *args) as (url, _):
                first: dict[str, str] = {}
                second: dict[str, str] = {}
                drive(url, again, clients, first)
                drive(url, again, clients, second)
            share, counted = moved_share(first, second)
            twice[label] = {"same_backend": round(1 - share, 4), "keys": counted}
        result["sent_twice"] = twice
        step("bounded loads: the same keys sent twice")
    return result


# ---- the sans-IO cores ---------------------------------------------------------------------


def spread_vs_vnodes(
    nodes: int, keys: int, seed: int, rings: int = 8
) -> dict[str, list[dict[str, float]]]:
    """Load cv (std / mean) against virtual nodes per server for each hash family, each
    the mean over `rings` rings (server names drawn anew; the slot formulas have one)."""
    text_keys = [str(r) for r in request_ids(keys, seed + 2)]
    int_keys = request_ids(keys, seed + 2)
    out: dict[str, list[dict[str, float]]] = {}
    for algorithm in ("sha256", "md5"):
        rows = []
        for v in VNODE_COUNTS:
            cvs, tops = [], []
            for r in range(rings):
                names = [f"server-{seed}-{r}-{i}" for i in range(nodes)]
                ring = HashRing(v, algorithm)
                ring.set_nodes(names)
                counts = Counter(ring.owner(k) for k in text_keys)
                s = spread([counts.get(n, 0) for n in names])
                cvs.append(s["cv"])
                tops.append(s["max_over_mean"])
            rows.append(
                {
                    "vnodes": v,
                    "cv": round(statistics.fmean(cvs), 4),
                    "max_over_mean": round(statistics.fmean(tops), 4),
                }
            )
        out[f"ring-{algorithm}"] = rows
    for family in ("quadratic", "python"):
        rows = []
        for v in VNODE_COUNTS:
            if v * nodes > BASELINE["slots"]:
                continue
            ring = SlotRing(family, BASELINE["slots"], v)
            ring.set_servers(range(nodes))
            counts = Counter(ring.owner(k) for k in int_keys)
            rows.append({"vnodes": v, **spread([counts.get(i, 0) for i in range(nodes)])})
        out[f"slots512-{family}"] = rows
    return out


class _Rendezvous:
    """Rendezvous hashing with the set_nodes/owner shape of the other cores."""

    def __init__(self) -> None:
        self.nodes: list[str] = []

    def set_nodes(self, nodes: Sequence[str]) -> None:
        self.nodes = list(nodes)

    def owner(self, key: str) -> str | None:
        return rendezvous_owner(key, self.nodes)


def key_movement(keys: int, seed: int) -> list[dict[str, Any]]:
    """The share of keys that move when a node joins (N -> N+1) and when one of the first
    N then leaves (N+1 -> N), against the ideal 1/(N+1), in the sans-IO cores: each core
    lives through both changes, as in a running balancer (Maglev's table keeps its size,
    jump's buckets keep their nodes)."""
    text_keys = [f"key-{seed}-{i}" for i in range(keys)]
    rows = []
    for n in range(3, 11):
        small = [f"server-{i}" for i in range(n)]
        big = [*small, f"server-{n}"]
        after_leave = [s for s in big if s != small[n // 2]]
        cores: dict[str, Callable[[], Any]] = {
            "ring (160 vnodes)": lambda: HashRing(160),
            "jump": JumpSlots,
            "rendezvous": _Rendezvous,
            "maglev": MaglevTable,
        }
        for name, make in cores.items():
            core = make()
            maps = []
            for nodes in (small, big, after_leave):
                core.set_nodes(nodes)
                maps.append([core.owner(k) for k in text_keys])
            before, joined, left = maps
            moved_join = sum(a != b for a, b in zip(before, joined, strict=True)) / keys
            moved_leave = sum(a != b for a, b in zip(joined, left, strict=True)) / keys
            rows.append(
                {
                    "algorithm": name,
                    "n": n,
                    "ideal": round(1 / (n + 1), 4),
                    "moved_on_join": round(moved_join, 4),
                    "moved_on_leave": round(moved_leave, 4),
                }
            )
    return rows


def bounded_loads(nodes: int, keys: int, seed: int) -> dict[str, Any]:
    """Max load over mean, plain ring against bounded loads at c = 1.25, on uniform keys
    and on Zipf-skewed keys (s = 1.1 over 1,000 distinct keys)."""
    rng = random.Random(f"bounded:{seed}")
    names = [f"server-{i}" for i in range(nodes)]
    workloads = {
        "uniform": [f"u-{rng.randrange(10**9)}" for _ in range(keys)],
        "zipf-1.1": zipf_keys(keys, 1000, ZIPF_S, f"bounded:{seed}"),
    }
    out: dict[str, Any] = {"balance_factor": BALANCE_FACTOR, "nodes": nodes, "keys": keys}
    for label, stream in workloads.items():
        for vnodes in (9, 160):
            ring = HashRing(vnodes)
            ring.set_nodes(names)
            plain = Counter(ring.owner(k) for k in stream)
            bounded: Counter[str] = Counter()
            worst = 0.0  # the highest max load / (c x mean + 1) after any placement
            for placed, k in enumerate(stream, start=1):
                bounded[bounded_load_owner(ring, k, bounded, BALANCE_FACTOR)] += 1
                bound = BALANCE_FACTOR * placed / nodes + 1
                worst = max(worst, max(bounded.values()) / bound)
            out[f"{label}/{vnodes}"] = {
                "ring_max_over_mean": spread([plain.get(n, 0) for n in names])["max_over_mean"],
                "bounded_max_over_mean": spread([bounded.get(n, 0) for n in names])[
                    "max_over_mean"
                ],
                "bounded_max_over_bound_at_any_time": round(worst, 4),
            }
    return out


# ---- reports -------------------------------------------------------------------------------


def _plots(out: Path, r: dict[str, Any]) -> list[str]:
    """The charts of whatever `r` holds (a run that stopped early draws what it measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if "a1" in r:
        a1 = r["a1"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(a1["per_server"])
        ax.bar(names, [a1["per_server"][n] for n in names], color="#4477aa")
        ax.axhline(a1["requests"] / 3, color="gray", ls="--", label="even share")
        ax.set(title=f"A-1: {a1['requests']:,} requests over N=3 (ring, 160 vnodes)",
               ylabel="requests served")  # fmt: skip
        ax.legend()
        save(fig, "a1-requests-per-server.png")

    if "a2" in r:
        rows = r["a2"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ns = [x["n"] for x in rows]
        ax.plot(ns, [x["mean"] for x in rows], "o-", label="average load per server")
        ax.plot(ns, [x["max"] for x in rows], "^--", label="busiest server")
        ax.plot(ns, [x["min"] for x in rows], "v--", label="least busy server")
        ax.set(title="A-2: load per server as replicas are added", xlabel="servers N",
               ylabel=f"requests of {rows[0]['requests']:,}", xticks=ns)  # fmt: skip
        ax.legend()
        save(fig, "a2-load-vs-n.png")

    if r.get("a3"):
        fig, ax = plt.subplots(figsize=(7, 2.8))
        marks = ["first_failed_heartbeat", "detected", "replacement_registered",
                 "first_answer_from_replacement"]  # fmt: skip
        colors = ["#ccbb44", "#ee6677", "#228833", "#4477aa"]
        for y, run in enumerate(r["a3"]):
            tl = run["timeline_s"]
            end = tl["first_answer_from_replacement"] or tl["replacement_registered"]
            ax.barh(y, end, color="#dddddd")
            for m, c in zip(marks, colors, strict=True):
                if tl[m] is not None:
                    ax.plot(tl[m], y, "o", color=c, label=m.replace("_", " ") if y == 0 else None)
        ax.axvspan(*BASELINE["detection_s"], color="#ee6677", alpha=0.12, label="baseline: 10-15 s")
        ax.set_yticks(range(len(r["a3"])), [run["label"] for run in r["a3"]])
        ax.set(title="A-3: a replica killed at 0 s, detected and replaced", xlabel="seconds")
        ax.legend(fontsize=7, loc="lower right")
        save(fig, "a3-replacement-timeline.png")

    if "a4" in r:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        slots = r["a4"]["slot_ring_512x9"]
        live = r["a4"]["balancer"]
        labels = [f"{f}\n512 slots, 9" for f in slots] + [f"balancer\n{k}" for k in live]
        values = [v["cv"] for v in slots.values()] + [v["cv"] for v in live.values()]
        ax.bar(labels, values, color=["#ee6677"] * 2 + ["#4477aa"] * (len(values) - 2))
        ax.set(title="A-4: spread of requests over 3 servers by hash", ylabel="std / mean")
        ax.tick_params(axis="x", labelsize=7)
        save(fig, "a4-hash-functions.png")

    if "spread_vs_vnodes" in r:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for family, rows in r["spread_vs_vnodes"].items():
            ax.plot([x["vnodes"] for x in rows], [x["cv"] for x in rows], "o-", label=family)
        ax.axvline(9, color="gray", ls=":", label="baseline: 9 virtual servers")
        ax.set(xscale="log", xlabel="virtual nodes per server", ylabel="load std / mean",
               title="Load spread against virtual nodes (5 servers)")  # fmt: skip
        ax.legend(fontsize=7)
        save(fig, "spread-vs-vnodes.png")

    if "movement" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
        runs = r["movement"]
        for ax, idx, what in zip(axes, (0, 1), ("a backend joins", "a backend leaves"),
                                 strict=True):  # fmt: skip
            for policy in dict.fromkeys(x["policy"] for x in runs):
                mine = [x for x in runs if x["policy"] == policy]
                ax.plot([x["n"] for x in mine], [x["steps"][idx]["moved"] for x in mine], "o-",
                        label=policy, ms=3)  # fmt: skip
            ns = sorted({x["n"] for x in runs})
            ax.plot(ns, [1 / (n + 1) for n in ns], "k--", label="ideal 1/(N+1)")
            ax.set(title=f"{what} (live balancer)",
                   xlabel="N (before the join)" if idx == 0 else "N (after the leave)")  # fmt: skip
        axes[0].set_ylabel("share of keys moved")
        axes[0].legend(fontsize=7)
        save(fig, "key-movement.png")

    if "bounded_load" in r:
        b = r["bounded_load"]
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        cases = [k for k in b if "/" in k]
        ring = [b[c]["ring_max_over_mean"] for c in cases]
        bounded = [b[c]["bounded_max_over_mean"] for c in cases]
        labels = [c.replace("/", "\n") + " vnodes" for c in cases]
        hot = r.get("bounded_live", {}).get("hot")
        if hot:
            labels.append(f"live balancer\nZipf, {r['bounded_live']['clients']} clients")
            ring.append(hot["ring_max_over_mean"])
            bounded.append(hot["bounded_max_over_mean"])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], ring, 0.4, label="ring")
        ax.bar([i + 0.2 for i in x], bounded, 0.4, label=f"bounded loads, c={BALANCE_FACTOR}")
        ax.axhline(BALANCE_FACTOR, color="gray", ls="--")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(ylabel="max load / mean", title="Bounded loads (5 servers)")
        ax.legend()
        save(fig, "bounded-load.png")
    return written


def markdown(r: dict[str, Any]) -> str:
    """The report of whatever `r` holds so far."""
    lines = [
        "# Hashing analyses",
        "",
        f"`{r['command']}`"
        + (f", {r['wall_seconds']} s" if "wall_seconds" in r else " (still running or stopped)")
        + f". Load: aiohttp, {r['concurrency']} at a time unless said otherwise, through the "
        "real balancer to real backends; no retries by the client.",
        "",
    ]
    if "a1" in r:
        a1 = r["a1"]
        lines += [
            f"## A-1: {a1['requests']:,} requests over N = 3",
            "",
            "| server | requests |",
            "|---|---|",
            *(f"| {n} | {c} |" for n, c in a1["per_server"].items()),
            "",
            f"std/mean {a1['cv']}, max/mean {a1['max_over_mean']}, failed "
            f"{sum(a1['failed'].values())}, {a1['rate']} req/s.",
            "",
        ]
    if "a2" in r:
        lines += [
            "## A-2: N = 2..6 (replicas added at run time)",
            "",
            "| N | average load | min | max | std/mean |",
            "|---|---|---|---|---|",
            *(f"| {x['n']} | {x['mean']} | {x['min']} | {x['max']} | {x['cv']} |" for x in r["a2"]),
            "",
        ]
    if r.get("a3"):
        lines += [
            "## A-3: a replica killed, detected and replaced",
            "",
            "| heartbeats | first failed heartbeat s | detected s | registered s | "
            "first answer s | failed requests |",
            "|---|---|---|---|---|---|",
        ]
        for run in r["a3"]:
            tl, hb = run["timeline_s"], run["heartbeat"]
            lines.append(
                f"| {run['label']}: every {hb['interval_s']} s, timeout {hb['timeout_s']} s, "
                f"{hb['failure_threshold']} in a row | {tl['first_failed_heartbeat']} | "
                f"{tl['detected']} | {tl['replacement_registered']} | "
                f"{tl['first_answer_from_replacement']} | {run['failed_after_kill']} of "
                f"{run['requests_after_kill']} |"
            )
        lines += ["", "Baseline design: 10-15 s to detect (10 s heartbeat, 5 s timeout).", ""]
    if "a4" in r:
        lines += [
            "## A-4: hash functions (3 servers)",
            "",
            "| hash | std/mean | max/mean |",
            "|---|---|---|",
            *(
                f"| {f}, 512 slots, 9 virtual servers | {v['cv']} | {v['max_over_mean']} |"
                for f, v in r["a4"]["slot_ring_512x9"].items()
            ),
            *(
                f"| balancer {k} (algorithm/vnodes) | {v['cv']} | {v['max_over_mean']} |"
                for k, v in r["a4"]["balancer"].items()
            ),
            "",
        ]
    if "movement" in r:
        lines += [
            "## Keys moved when a backend joins or leaves, through the live balancer",
            "",
            f"{r['movement'][0]['keys']:,} keys sent after each change; N backends, one joins "
            "(N + 1), then one of the first N leaves (the middle one). Ideal: 1/(N + 1).",
            "",
            "| policy | N | ideal | join | leave | moved without a change | failed |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {x['policy']} | {x['n']} | {x['steps'][0]['ideal']} | "
                f"{x['steps'][0]['moved']} | {x['steps'][1]['moved']} | "
                f"{x.get('moved_without_change', '-')} | {x['failed']} |"
                for x in r["movement"]
            ),
            "",
        ]
    if "bounded_live" in r:
        bl = r["bounded_live"]
        hot = bl["hot"]
        lines += [
            f"## Bounded loads on the live balancer, c = {bl['balance_factor']}",
            "",
            f"{bl['requests']:,} requests, Zipf s = {bl['zipf_s']} over 1,000 keys, "
            f"{bl['clients']} clients at once, 5 backends.",
            "",
            "| placements | spilled off their own backend | most load over the bound at a "
            "placement | in flight once all answered | max/mean served | ring max/mean, same keys |",
            "|---|---|---|---|---|---|",
            f"| {hot['placements']} | {hot['spills']} ({hot['spill_share']:.1%}) | "
            f"{hot['worst_load_over_bound']} | {hot['in_flight_after']} | "
            f"{hot['bounded_max_over_mean']} | {hot['ring_max_over_mean']} |",
            "",
            "The same 2,000 Zipf-drawn requests "
            f"({next(iter(bl['sent_twice'].values()))['keys']} distinct keys) sent twice, one "
            "balancer each time:",
            "",
            "| clients | same backend both times |",
            "|---|---|",
            *(f"| {k} | {v['same_backend']:.2%} |" for k, v in bl["sent_twice"].items()),
            "",
        ]
    if "spread_vs_vnodes" in r:
        lines += [
            "## Load std/mean against virtual nodes (5 servers, 20,000 keys; rings: mean of 8)",
            "",
            "| family | " + " | ".join(str(v) for v in VNODE_COUNTS) + " |",
            "|---|" + "---|" * len(VNODE_COUNTS),
        ]
        for family, rows_ in r["spread_vs_vnodes"].items():
            by = {x["vnodes"]: x["cv"] for x in rows_}
            lines.append(
                f"| {family} | " + " | ".join(str(by.get(v, "-")) for v in VNODE_COUNTS) + " |"
            )
        lines.append("")
    if "key_movement" in r:
        lines += [
            "## Keys moved when one node joins or leaves, in the sans-IO cores (20,000 keys)",
            "",
            "| algorithm | N | ideal | join | leave |",
            "|---|---|---|---|---|",
            *(
                f"| {x['algorithm']} | {x['n']} | {x['ideal']} | {x['moved_on_join']} | "
                f"{x['moved_on_leave']} |"
                for x in r["key_movement"]
                if x["n"] in (3, 5, 10)
            ),
            "",
        ]
    if "bounded_load" in r:
        lines += [
            f"## Bounded loads in the sans-IO core, c = {BALANCE_FACTOR} (5 servers, 10,000 keys)",
            "",
            "| keys / vnodes | ring max/mean | bounded max/mean | bounded max / (c x mean + 1), "
            "worst moment |",
            "|---|---|---|---|",
            *(
                f"| {k} | {v['ring_max_over_mean']} | {v['bounded_max_over_mean']} | "
                f"{v['bounded_max_over_bound_at_any_time']} |"
                for k, v in r["bounded_load"].items()
                if "/" in k
            ),
            "",
        ]
    if "error" in r:
        lines += ["## Stopped early", "", r["error"], ""]
    return "\n".join(lines)


def save(out_dir: Path, results: dict[str, Any]) -> None:
    """hashing.json and hashing.md as they stand (each written whole, then renamed)."""
    for name, text in (
        ("hashing.json", json.dumps(results, indent=2)),
        ("hashing.md", markdown(results)),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


@click.command("hashing")
@click.option("--out", default="reports/hashing", type=OutputPath(directory=True),
              help="Where hashing.json, hashing.md and the PNG charts go.")  # fmt: skip
@click.option("--requests", default=10_000, type=click.IntRange(100, 100_000),
              help="Requests per live run (the baseline design sent 10,000).")  # fmt: skip
@click.option("--concurrency", default=64, type=click.IntRange(1, 512),
              help="Requests in flight at once.")  # fmt: skip
@click.option("--movement-keys", default=3000, type=click.IntRange(100, 100_000),
              help="Keys sent after each change in the live key-movement runs.")  # fmt: skip
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Keys and node seeds.")
@click.option("--port-base", default=0, type=click.IntRange(0, 65000),
              help="First of 70 ports the clusters use (0: free ports, tried again on others "
              "when taken; the ring hashes backend URLs, so fixed ports repeat the same "
              "loads).")  # fmt: skip
def command(
    out: str, requests: int, concurrency: int, movement_keys: int, seed: int, port_base: int
) -> None:
    """Run the load-distribution analyses (A-1..A-4, keys moved and bounded loads through
    the live balancer, and the hashing cores) into --out, saving each as it finishes."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(f"{out}: {err.strerror or err}", param_hint="--out") from None
    started = time.monotonic()
    console = Console()
    results: dict[str, Any] = {
        "command": f"twlb hashing --out {out} --requests {requests} --concurrency "
        f"{concurrency} --movement-keys {movement_keys} --seed {seed} --port-base {port_base}",
        "concurrency": concurrency,
        "baseline": BASELINE,
    }
    save(out_dir, results)
    ours = HeartbeatSettings()
    baseline = HeartbeatSettings(**BASELINE["heartbeat"])
    with Progress(
        TextColumn("{task.description:<52}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("hashing analyses", total=21)

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)

        def a3() -> dict[str, Any]:
            runs = []
            for offset, label, beat in ((20, "ours", ours), (30, "baseline", baseline)):
                base = port_base + offset if port_base else 0
                runs.append(run_a3(out_dir, label, beat, seed, port_base=base))
                step(f"A-3: replacement with {label} heartbeats")
            return {"a3": runs}

        def cores() -> dict[str, Any]:
            done = {"spread_vs_vnodes": spread_vs_vnodes(5, 20_000, seed)}
            step("load spread against virtual nodes")
            done["key_movement"] = key_movement(20_000, seed)
            done["bounded_load"] = bounded_loads(5, 10_000, seed)
            step("keys moved and bounded loads in the cores")
            return done

        analyses: list[Callable[[], dict[str, Any]]] = [
            lambda: run_a1_a4(out_dir, requests, concurrency, seed, step, port_base),
            lambda: run_a2(out_dir, requests, concurrency, seed, step, port_base),
            a3,
            lambda: {
                "movement": run_movement(out_dir, movement_keys, concurrency, seed, step, port_base)
            },
            lambda: {"bounded_live": run_bounded_live(out_dir, requests, seed, step, port_base)},
            cores,
        ]
        try:
            for analysis in analyses:
                results |= analysis()
                save(out_dir, results)
        except (Exception, KeyboardInterrupt) as err:
            if isinstance(err, click.ClickException):
                why = err.format_message()
            elif isinstance(err, KeyboardInterrupt):
                why = "interrupted"
            else:  # a bug or a surprise: its traceback goes to a file, not the terminal
                trace = out_dir / "hashing-error.log"
                trace.write_text("".join(traceback.format_exception(err)))
                why = f"{type(err).__name__}: {err} (traceback in {trace})"
            results["error"] = f"stopped: {why}"
            results["charts"] = _plots(out_dir, results)
            save(out_dir, results)
            raise click.ClickException(
                f"{results['error']}; what was measured is saved in {out_dir}/hashing.json"
            ) from None
        results["wall_seconds"] = round(time.monotonic() - started, 1)
        results["charts"] = _plots(out_dir, results)
        save(out_dir, results)
        step("charts")
    console.print(markdown(results))
    console.print(
        f"Reports in {out_dir}/: hashing.json, hashing.md, {', '.join(results['charts'])}"
    )
