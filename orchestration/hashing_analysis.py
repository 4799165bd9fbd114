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
- Load standard deviation against virtual nodes per hash family; the share of keys that
  move when a node joins or leaves for ring, jump, rendezvous and Maglev against 1/N;
  the maximum load over the mean under bounded loads (c = 1.25), on uniform and skewed keys.

Everything goes to `--out` (default reports/hashing): hashing.json, hashing.md and PNGs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import click
from twlb.balancer.hashing import (
    HashRing,
    MaglevTable,
    SlotRing,
    bounded_load_owner,
    jump_owner,
    maglev_table_size,
    rendezvous_owner,
)
from twlb.orchestration.runtime import EmbeddedCluster
from twlb.orchestration.scaling import FailureMode, HeartbeatSettings
from twlb.processes.managed import free_port_range

from twlb.options import OutputPath
from twlb.spec import API_GROUP, API_VERSION, KIND, ObjectMeta, TrustCluster, TrustClusterSpec

#: The baseline design's figures docs/hashing.md sets ours beside.
COURSE = {
    "detection_s": [10, 15],  # a 10 s heartbeat with a 5 s timeout
    "heartbeat": {"interval_s": 10.0, "timeout_s": 5.0, "failure_threshold": 1},
    "slots": 512,
    "virtual_servers": 9,
}
VNODE_COUNTS = (1, 2, 5, 9, 20, 50, 100, 200, 500)
BALANCE_FACTOR = 1.25


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


async def _drive(url: str, keys: Sequence[str], concurrency: int) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    it = iter(keys)
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        for key in it:
            try:
                async with session.get(url + "/work", params={"key": key}) as r:
                    if r.status == 200:
                        counts[(await r.json())["node"]] += 1
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


def drive(url: str, keys: Sequence[str], concurrency: int) -> dict[str, Any]:
    """Send one GET /work per key through `url`, `concurrency` at a time (aiohttp)."""
    return asyncio.run(_drive(url, keys, concurrency))


def spread(counts: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation relative to the mean, and max over mean of loads."""
    mean = statistics.fmean(counts)
    return {
        "mean": round(mean, 2),
        "cv": round(statistics.pstdev(counts) / mean, 4) if mean else 0.0,
        "max_over_mean": round(max(counts) / mean, 4) if mean else 0.0,
    }


def ports(port_base: int, offset: int, count: int) -> int:
    """The first of `count` ports for one of the analysis clusters: `port_base` + `offset`,
    or free ones (0). The ring hashes backend URLs, so fixed ports give repeatable loads."""
    return port_base + offset if port_base else free_port_range(count)


def run_a1_a4(
    out: Path, requests: int, concurrency: int, seed: int, step: Callable[[str], None],
    port_base: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """A-1 (N = 3, the balancer's defaults) and A-4's live half (9 and 160 virtual nodes,
    sha256 and md5), on one cluster whose balancer restarts with each setting."""
    keys = [str(r) for r in request_ids(requests, seed)]
    tc = analysis_cluster(3, "a1", seed)
    cluster = EmbeddedCluster(
        tc, port_base=ports(port_base, 0, 8), state_dir=out / "state" / "a1", prometheus=False
    )
    live: dict[str, Any] = {}
    with cluster:
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
        ring = SlotRing(family, COURSE["slots"], COURSE["virtual_servers"])
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
    cluster = EmbeddedCluster(
        analysis_cluster(2, "a2", seed),
        port_base=ports(port_base, 10, 10),
        state_dir=out / "state" / "a2",
        prometheus=False,
    )
    rows = []
    with cluster:
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
    cluster = EmbeddedCluster(
        analysis_cluster(3, f"a3-{label}", seed),
        port_base=port_base or free_port_range(10),
        state_dir=out / "state" / f"a3-{label}",
        prometheus=False,
        failure_mode=FailureMode.REPLACE,
        heartbeat=beat,
    )
    log: list[tuple[float, str]] = []
    stop = threading.Event()
    with cluster:
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
            if v * nodes > COURSE["slots"]:
                continue
            ring = SlotRing(family, COURSE["slots"], v)
            ring.set_servers(range(nodes))
            counts = Counter(ring.owner(k) for k in int_keys)
            rows.append({"vnodes": v, **spread([counts.get(i, 0) for i in range(nodes)])})
        out[f"slots512-{family}"] = rows
    return out


def _ring_owner(nodes: list[str]) -> Callable[[str], str | None]:
    ring = HashRing(160)
    ring.set_nodes(nodes)
    return ring.owner


def _maglev_owner(nodes: list[str], size: int) -> Callable[[str], str | None]:
    table = MaglevTable(size=size)
    table.set_nodes(nodes)
    return table.owner


def _jump(key: str, nodes: list[str]) -> str | None:
    return jump_owner(key, nodes)


def _rendezvous(key: str, nodes: list[str]) -> str | None:
    return rendezvous_owner(key, nodes)


def key_movement(keys: int, seed: int) -> list[dict[str, Any]]:
    """The share of keys that move when a node joins (N -> N+1) or leaves (N+1 -> N),
    against the ideal 1/(N+1). Jump hash can only lose its last bucket."""
    text_keys = [f"key-{seed}-{i}" for i in range(keys)]
    rows = []
    for n in range(3, 11):
        small = [f"server-{i}" for i in range(n)]
        big = [*small, f"server-{n}"]
        leaver = small[n // 2]
        after_leave = [s for s in big if s != leaver]

        algorithms: dict[str, Callable[[list[str]], Callable[[str], str | None]]] = {
            "ring (160 vnodes)": _ring_owner,
            "jump": lambda nodes: functools.partial(_jump, nodes=nodes),
            "rendezvous": lambda nodes: functools.partial(_rendezvous, nodes=nodes),
            # The table keeps the size the larger set needs, as a running Maglev does.
            "maglev": functools.partial(_maglev_owner, size=maglev_table_size(n + 1)),
        }
        for name, build in algorithms.items():
            before, joined = build(small), build(big)
            left = build(big[:-1] if name == "jump" else after_leave)
            moved_join = sum(before(k) != joined(k) for k in text_keys) / keys
            moved_leave = sum(joined(k) != left(k) for k in text_keys) / keys
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
    distinct = [f"key-{i}" for i in range(1000)]
    weights = [1 / (k + 1) ** 1.1 for k in range(len(distinct))]
    workloads = {
        "uniform": [f"u-{rng.randrange(10**9)}" for _ in range(keys)],
        "zipf-1.1": rng.choices(distinct, weights, k=keys),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    a1 = r["a1"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(a1["per_server"])
    ax.bar(names, [a1["per_server"][n] for n in names], color="#4477aa")
    ax.axhline(a1["requests"] / 3, color="gray", ls="--", label="even share")
    ax.set(title=f"A-1: {a1['requests']:,} requests over N=3 (ring, 160 vnodes)",
           ylabel="requests served")  # fmt: skip
    ax.legend()
    save(fig, "a1-requests-per-server.png")

    rows = r["a2"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ns = [x["n"] for x in rows]
    ax.plot(ns, [x["mean"] for x in rows], "o-", label="average load per server")
    ax.plot(ns, [x["max"] for x in rows], "^--", label="busiest server")
    ax.plot(ns, [x["min"] for x in rows], "v--", label="least busy server")
    ax.set(title="A-2: load per server as replicas are added", xlabel="servers N",
           ylabel="requests of 10,000", xticks=ns)  # fmt: skip
    ax.legend()
    save(fig, "a2-load-vs-n.png")

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
    ax.axvspan(*COURSE["detection_s"], color="#ee6677", alpha=0.12, label="course: 10-15 s")
    ax.set_yticks(range(len(r["a3"])), [run["label"] for run in r["a3"]])
    ax.set(title="A-3: a replica killed at 0 s, detected and replaced", xlabel="seconds")
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "a3-replacement-timeline.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    slots = r["a4"]["slot_ring_512x9"]
    live = r["a4"]["balancer"]
    labels = [f"{f}\n512 slots, 9" for f in slots] + [f"balancer\n{k}" for k in live]
    values = [v["cv"] for v in slots.values()] + [v["cv"] for v in live.values()]
    ax.bar(labels, values, color=["#ee6677"] * 2 + ["#4477aa"] * (len(values) - 2))
    ax.set(title="A-4: spread of 10,000 requests over 3 servers by hash", ylabel="std / mean")
    ax.tick_params(axis="x", labelsize=7)
    save(fig, "a4-hash-functions.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for family, rows in r["spread_vs_vnodes"].items():
        ax.plot([x["vnodes"] for x in rows], [x["cv"] for x in rows], "o-", label=family)
    ax.axvline(9, color="gray", ls=":", label="course: 9 virtual servers")
    ax.set(xscale="log", xlabel="virtual nodes per server", ylabel="load std / mean",
           title="Load spread against virtual nodes (5 servers)")  # fmt: skip
    ax.legend(fontsize=7)
    save(fig, "spread-vs-vnodes.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    moves = r["key_movement"]
    for ax, what in zip(axes, ("moved_on_join", "moved_on_leave"), strict=True):
        for alg in dict.fromkeys(x["algorithm"] for x in moves):
            rows = [x for x in moves if x["algorithm"] == alg]
            ax.plot([x["n"] for x in rows], [x[what] for x in rows], "o-", label=alg, ms=3)
        rows = [x for x in moves if x["algorithm"] == "jump"]
        ax.plot([x["n"] for x in rows], [x["ideal"] for x in rows], "k--", label="ideal 1/(N+1)")
        ax.set(title=what.replace("_", " "), xlabel="N (before the join)")
    axes[0].set_ylabel("share of keys moved")
    axes[0].legend(fontsize=7)
    save(fig, "key-movement.png")

    b = r["bounded_load"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    cases = [k for k in b if "/" in k]
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], [b[c]["ring_max_over_mean"] for c in cases], 0.4, label="ring")
    ax.bar([i + 0.2 for i in x], [b[c]["bounded_max_over_mean"] for c in cases], 0.4,
           label=f"bounded loads, c={BALANCE_FACTOR}")  # fmt: skip
    ax.axhline(BALANCE_FACTOR, color="gray", ls="--")
    ax.set_xticks(list(x), [c.replace("/", "\n") + " vnodes" for c in cases], fontsize=7)
    ax.set(ylabel="max load / mean", title="Bounded loads (5 servers, 10,000 keys)")
    ax.legend()
    save(fig, "bounded-load.png")
    return written


def markdown(r: dict[str, Any]) -> str:
    a1, rows = r["a1"], r["a2"]
    lines = [
        "# Hashing analyses",
        "",
        f"`{r['command']}`, {r['wall_seconds']} s. Load: aiohttp, {r['concurrency']} at a time, "
        "through the real balancer (consistent-hash) to real backends.",
        "",
        f"## A-1: {a1['requests']:,} requests over N = 3",
        "",
        "| server | requests |",
        "|---|---|",
        *(f"| {n} | {c} |" for n, c in a1["per_server"].items()),
        "",
        f"std/mean {a1['cv']}, max/mean {a1['max_over_mean']}, failed {sum(a1['failed'].values())}, "
        f"{a1['rate']} req/s.",
        "",
        "## A-2: N = 2..6 (replicas added at run time)",
        "",
        "| N | average load | min | max | std/mean |",
        "|---|---|---|---|---|",
        *(f"| {x['n']} | {x['mean']} | {x['min']} | {x['max']} | {x['cv']} |" for x in rows),
        "",
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
    lines += [
        "",
        "Baseline design: 10-15 s to detect (10 s heartbeat, 5 s timeout).",
        "",
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
    lines += [
        "",
        "## Keys moved when one node joins or leaves (20,000 keys)",
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
        f"## Bounded loads, c = {BALANCE_FACTOR} (5 servers, 10,000 keys)",
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
    return "\n".join(lines)


@click.command("hashing")
@click.option("--out", default="reports/hashing", type=OutputPath(directory=True),
              help="Where hashing.json, hashing.md and the PNG charts go.")  # fmt: skip
@click.option("--requests", default=10_000, type=click.IntRange(100, 100_000),
              help="Requests per live run (the baseline design sent 10,000).")  # fmt: skip
@click.option("--concurrency", default=64, type=click.IntRange(1, 512),
              help="Requests in flight at once.")  # fmt: skip
@click.option("--seed", default=0, type=click.IntRange(min=0), help="Keys and node seeds.")
@click.option("--port-base", default=0, type=click.IntRange(0, 65000),
              help="First of 40 ports the clusters use (0: free ports; the ring hashes "
              "backend URLs, so fixed ports repeat the same loads).")  # fmt: skip
def command(out: str, requests: int, concurrency: int, seed: int, port_base: int) -> None:
    """Run the load-distribution analyses (A-1..A-4 and the hashing cores) into --out."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    console = Console()
    results: dict[str, Any] = {
        "command": f"twlb hashing --out {out} --requests {requests} --concurrency "
        f"{concurrency} --seed {seed} --port-base {port_base}",
        "concurrency": concurrency,
        "course": COURSE,
    }
    with Progress(
        TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as progress:  # fmt: skip
        task = progress.add_task("hashing analyses", total=16)

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)

        results |= run_a1_a4(out_dir, requests, concurrency, seed, step, port_base)
        results |= run_a2(out_dir, requests, concurrency, seed, step, port_base)
        results["a3"] = []
        ours = HeartbeatSettings()
        course = HeartbeatSettings(**COURSE["heartbeat"])
        for offset, label, beat in ((20, "ours", ours), (30, "course", course)):
            base = port_base + offset if port_base else 0
            results["a3"].append(run_a3(out_dir, label, beat, seed, port_base=base))
            step(f"A-3: replacement with {label} heartbeats")
        results["spread_vs_vnodes"] = spread_vs_vnodes(5, 20_000, seed)
        step("load spread against virtual nodes")
        results["key_movement"] = key_movement(20_000, seed)
        step("keys moved on join and leave")
        results["bounded_load"] = bounded_loads(5, 10_000, seed)
        step("bounded loads")
        results["wall_seconds"] = round(time.monotonic() - started, 1)
        results["charts"] = _plots(out_dir, results)
        step("charts")
    (out_dir / "hashing.json").write_text(json.dumps(results, indent=2))
    (out_dir / "hashing.md").write_text(markdown(results))
    console.print(markdown(results))
    console.print(
        f"Reports in {out_dir}/: hashing.json, hashing.md, {', '.join(results['charts'])}"
    )
