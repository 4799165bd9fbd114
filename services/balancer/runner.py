"""The balancer's event loops: a thin asyncio runner around the decisions of `core.py`.

The `Balancer` decides; this module only waits and reads. Its loops:

- one health loop per backend: `GET /healthz` every `health_interval_s` (each backend at
  its own offset within the interval, at most `health_concurrency` at once, each check
  capped by its pool and `health_timeout_s`), fed to `Balancer.on_health_check`;
- the gossip loop: every backend's `GET /gossip` each `gossip_poll_s`, fed to
  `Balancer.apply_gossip`;
- the tick loop: every `policy_tick_s`, the model and oracle truth files re-read when a
  trust update is due (`Balancer.reload_files`), then `Balancer.tick`.

A bug in one round of a loop is logged and the loop goes on: routing must not stop. The
runner's own connections (health checks and gossip views go through small pools of their
own) are closed when their backend leaves or the runner stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import orjson
from twlb.balancer.fleet import Fleet
from twlb.balancer.settings import BalancerSettings
from twlb.balancer.upstream import BackendPool, UpstreamError, UpstreamLimits, UpstreamResponse

log = logging.getLogger("twlb.balancer")

#: Caps on one backend's /gossip answer (a membership view of up to ~1,000 members).
GOSSIP_VIEW_LIMITS = UpstreamLimits(
    max_head_bytes=16 * 1024, max_headers=50, max_body_bytes=1 << 20
)


class Pool(Protocol):
    """A backend's connection pool as the loops use it (`upstream.BackendPool`)."""

    async def request(
        self, method: str, target: bytes, headers: list, body: bytes, timeout: float
    ) -> UpstreamResponse: ...

    def close(self) -> None: ...


class Driven(Protocol):
    """The decisions the loops drive (`core.Balancer`)."""

    settings: BalancerSettings
    clock: Callable[[], float]
    fleet: Fleet

    def on_health_check(self, backend: str, ok: bool, now: float) -> bool: ...

    def apply_gossip(self, answers: dict[str, dict[str, Any] | None], now: float) -> None: ...

    def trust_due(self, now: float) -> bool: ...

    def reload_files(self) -> None: ...

    def tick(self, now: float) -> None: ...


class _Watch:
    """The runner's part of one backend: its health loop and its two small pools."""

    __slots__ = ("task", "health_pool", "gossip_pool")

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.health_pool: Pool | None = None
        self.gossip_pool: Pool | None = None

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for pool in (self.health_pool, self.gossip_pool):
            if pool is not None:
                pool.close()


class Runner:
    """Runs one balancer's loops on the running event loop, from `start` to `stop`."""

    def __init__(
        self,
        balancer: Driven,
        health_transport: Callable[[str], Pool],
        gossip_transport: Callable[[str], Pool] | None = None,
    ) -> None:
        self.balancer = balancer
        self.settings = balancer.settings
        self.health_transport = health_transport
        self.gossip_transport = gossip_transport or partial(
            BackendPool, max_idle=1, limits=GOSSIP_VIEW_LIMITS
        )
        self._watches: dict[str, _Watch] = {}
        self._tasks: list[asyncio.Task] = []
        self._health_slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        """Start every loop (in the running event loop)."""
        self._health_slots = asyncio.Semaphore(self.settings.health_concurrency)
        for url in self.balancer.fleet.urls:
            self.backend_added(url)
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="twlb-balancer-tick"))
        if self.settings.gossip_poll_s > 0:
            self._tasks.append(
                asyncio.create_task(self._gossip_loop(), name="twlb-balancer-gossip")
            )

    async def stop(self) -> None:
        """Cancel every loop, wait for them to end, close the runner's pools."""
        tasks = [*(w.task for w in self._watches.values() if w.task is not None), *self._tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in self._watches.values():
            w.close()
        self._watches.clear()
        self._tasks.clear()

    def backend_added(self, url: str) -> None:
        """Start checking a backend that joined the fleet."""
        watch = self._watches[url] = _Watch()
        watch.task = asyncio.create_task(self._health_loop(url, watch), name=f"twlb-health {url}")

    def backend_removed(self, url: str) -> None:
        """Stop checking a backend that left the fleet and close its pools."""
        watch = self._watches.pop(url, None)
        if watch is not None:
            watch.close()

    async def _health_loop(self, backend: str, watch: _Watch) -> None:
        """Active heartbeat: GET /healthz every interval, to `on_health_check`.

        Each backend's checks start at its own offset within the interval (so a large fleet
        is not checked in one burst) and at most `health_concurrency` run at once; a check
        reads at most `health_max_bytes` and must end within `health_timeout_s`.
        """
        assert self._health_slots is not None
        b = self.balancer
        clock = b.clock
        pool = watch.health_pool = self.health_transport(backend)
        interval = self.settings.health_interval_s
        timeout = self.settings.health_timeout_s
        await asyncio.sleep(random.Random(f"{self.settings.seed}:{backend}").random() * interval)
        while True:
            started = clock()
            async with self._health_slots:
                try:
                    r = await pool.request("GET", b"/healthz", [], b"", timeout)
                    ok = r.status == 200
                except UpstreamError:
                    ok = False
            if not b.on_health_check(backend, ok, clock()):
                return  # it left the fleet meanwhile
            await asyncio.sleep(max(0.0, interval - (clock() - started)))

    async def _gossip_loop(self) -> None:
        """Read every backend's gossip view; the balancer acts on what members agree on."""
        b = self.balancer
        interval = self.settings.gossip_poll_s
        while True:
            started = b.clock()
            backends = list(b.fleet.urls)
            answers = await asyncio.gather(*(self._gossip_view(u) for u in backends))
            try:
                b.apply_gossip(dict(zip(backends, answers, strict=True)), b.clock())
            except Exception:  # a bug here must not stop routing
                log.exception("gossip verdicts failed")
            await asyncio.sleep(max(0.0, interval - (b.clock() - started)))

    async def _gossip_view(self, backend: str) -> dict[str, Any] | None:
        """One backend's /gossip answer, read through a pool of its own capped at
        GOSSIP_VIEW_LIMITS, under the health timeout; None when there is no usable one."""
        watch = self._watches.get(backend)
        if watch is None:  # it left, or joined after this round began
            return None
        pool = watch.gossip_pool
        if pool is None:
            pool = watch.gossip_pool = self.gossip_transport(backend)
        try:
            r = await pool.request("GET", b"/gossip", [], b"", self.settings.health_timeout_s)
            if r.status != 200:
                return None
            answer = orjson.loads(r.body)
        except (UpstreamError, orjson.JSONDecodeError):
            return None
        return answer if isinstance(answer, dict) else None

    async def _tick_loop(self) -> None:
        """`tick` every policy tick, the files re-read first when trust is due; a bug in
        one tick must not stop routing for good."""
        b = self.balancer
        while True:
            await asyncio.sleep(self.settings.policy_tick_s)
            try:
                now = b.clock()
                if b.trust_due(now):
                    b.reload_files()
                b.tick(now)
            except Exception:
                log.exception("balancer tick failed")
