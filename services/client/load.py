"""The open-loop load generator: GET /work at a constant arrival rate, every answer verified.

Request i is due at `start + i / rate` whatever happened to earlier ones (open loop), and
its latency is counted from that scheduled time, so a slow target or a late generator
shows up in the latencies instead of silently lowering the load (no coordinated
omission). A run ends at `duration` or `count`, whichever comes first, or early on
SIGINT/SIGTERM (partial) or when the breaker opens on a target never reached
(unreachable); requests still in flight then get a bounded time to finish and are
cancelled after it. `--workers N` splits the arrivals over N processes, interleaved on
one shared schedule, and merges their tallies.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import orjson
import uvloop
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from twlb.client.breaker import BreakerConfig, BreakerState, BreakerTransition
from twlb.client.client import CallStatus, ClientListener, ClientPolicy, ResilientClient
from twlb.client.report import LoadTally

from twlb.options import Flag
from twlb.work import ROUNDS_MAX, ROUNDS_MIN, digest, key_problem

WORK_PATH = "/work"
#: Extra time in-flight requests get after the last send, beyond the call's own deadline.
DRAIN_GRACE_S = 0.5
#: Time in-flight requests get after an interrupt, at most.
INTERRUPT_DRAIN_S = 2.0
#: The load generator's breaker opens at this share of failed tries (percent), above
#: resilience4j's 50: behind a balancer, which ejects bad backends itself, 50 % trips on
#: one backend's crash and fails calls that retries would have saved (bench/client_compare.py
#: measures both); a dead or drowning target still opens it.
LOAD_BREAKER_FAILURE_RATE = 80.0


def load_breaker() -> BreakerConfig:
    """The breaker `twlb load --mode resilient` uses unless told otherwise."""
    return BreakerConfig(failure_rate_threshold=LOAD_BREAKER_FAILURE_RATE)


def load_policy() -> ClientPolicy:
    """The resilient client `twlb load` drives unless told otherwise: ClientPolicy's
    defaults with the load generator's breaker."""
    return ClientPolicy(breaker=load_breaker())


#: Longest the sender sleeps between looks at the stop flag.
MAX_IDLE_S = 0.1
#: How often a worker publishes its counts to the parent's progress display.
PUBLISH_EVERY_S = 0.25


class Mode(StrEnum):
    BASIC = "basic"  # one try, no breaker, no retry: the baseline
    RESILIENT = "resilient"  # breaker, retries with backoff and budget, deadline


def url_problem(value: str) -> str | None:
    """Why `value` is not a base URL `twlb load` can send to, or None when it is one."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as err:
        return f"{value!r} is not a URL: {err}"
    if url.scheme not in ("http", "https"):
        return f"{value!r} must start with http:// or https://"
    if not url.host:
        return f"{value!r} has no host"
    if url.query or url.fragment:
        return f"{value!r} must be a base URL without a query or fragment"
    return None


class LoadPlan(BaseModel):
    """Everything a run needs, each setting declared once (`twlb load`'s flags come from
    these fields and the client's `ClientPolicy`); the report echoes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="Balancer or backend base URL.")
    rate: float = Field(
        100.0, gt=0.0, le=1_000_000.0, description="Requests per second (arrivals)."
    )
    duration_s: Annotated[float, Flag("--duration", param="duration")] = Field(
        10.0, gt=0.0, le=86_400.0, description="Seconds to send for."
    )
    count: int | None = Field(None, ge=1, description="Stop after this many requests.")
    mode: Mode = Field(
        Mode.RESILIENT,
        description="basic: one try with --timeout, no breaker, retry or hedge (the other "
        "client flags are not used); resilient: breaker, retries, budget, deadline.",
    )
    key_prefix: str = Field("key-", max_length=200, description="Keys are PREFIX0 .. PREFIX(N-1).")
    keys: int = Field(1000, ge=1, le=10_000_000, description="Distinct keys.")
    rounds: int = Field(1, ge=ROUNDS_MIN, le=ROUNDS_MAX, description="Hash rounds per request.")
    seed: int = Field(0, ge=0, description="Seed of the key sequence.")
    workers: int = Field(1, ge=1, le=64, description="Sending processes.")
    pool_size: int = Field(256, ge=1, le=65_536, description="Connections per process.")
    client: ClientPolicy = Field(
        default_factory=load_policy, description="The resilient client's policy."
    )

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        problem = url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _keys_are_keys(self) -> LoadPlan:
        for probe in (f"{self.key_prefix}0", f"{self.key_prefix}{self.keys - 1}"):
            problem = key_problem(probe)
            if problem is not None:
                raise ValueError(f"key_prefix: keys like {probe!r}: {problem}")
        return self

    def policy(self) -> ClientPolicy:
        if self.mode is Mode.BASIC:
            return ClientPolicy.basic(self.client.timeout_s)
        return self.client

    def drain_s(self) -> float:
        """How long in-flight calls may still take once sending stops."""
        return self.policy().deadline_s + DRAIN_GRACE_S  # basic: its deadline is its timeout

    def settings(self) -> dict[str, Any]:
        """The plan as the report shows it: its own settings and the policy it ran with."""
        d = self.model_dump(mode="json", exclude={"client"})
        # The report's own `duration_s` is how long the run really took.
        d["target_duration_s"] = d.pop("duration_s")
        policy = self.policy().model_dump(mode="json")
        if policy["breaker"] is None:
            policy.pop("breaker")
        return d | policy


class KeyChooser:
    """Seeded keys, each with its ready-made request path and expected digest."""

    def __init__(self, plan: LoadPlan, worker: int) -> None:
        self._rng = random.Random(f"twlb-load:{plan.seed}:{worker}")
        self._n = plan.keys
        self._prefix = plan.key_prefix
        self._rounds = plan.rounds
        self._cache: dict[int, tuple[str, str, str]] = {}

    def next(self) -> tuple[str, str, str]:
        """(key, path with query, expected digest) of the next request."""
        i = self._rng.randrange(self._n)
        entry = self._cache.get(i)
        if entry is None:
            key = f"{self._prefix}{i}"
            path = f"{WORK_PATH}?key={quote(key, safe='')}&rounds={self._rounds}"
            entry = self._cache[i] = (key, path, digest(key, self._rounds))
        return entry


def answer_verifier(key: str, rounds: int, expected: str) -> Callable[[httpx.Response], bool]:
    """A check that a 200 body echoes the key and rounds and carries the right digest."""

    def verify(response: httpx.Response) -> bool:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return False
        return (
            isinstance(body, dict)
            and body.get("digest") == expected
            and body.get("key") == key
            and body.get("rounds") == rounds
        )

    return verify


#: Longest node name a wrong answer may put into the tally (a peer's body is not trusted).
MAX_NODE_NAME = 64


def answering_node(response: httpx.Response | None) -> str:
    """The node a work answer names (its `node` field), or '?' when it names none."""
    if response is None:
        return "?"
    try:
        node = orjson.loads(response.content).get("node")
    except (orjson.JSONDecodeError, AttributeError):
        return "?"
    return node[:MAX_NODE_NAME] if isinstance(node, str) and node else "?"


class _TallyListener(ClientListener):
    """Feeds what the client does into the tally; notices a breaker opening."""

    def __init__(self, tally: LoadTally, t0: float, breaker_opened: asyncio.Event) -> None:
        self._tally = tally
        self._t0 = t0
        self._breaker_opened = breaker_opened

    def on_breaker_transition(self, target: str, transition: BreakerTransition) -> None:
        self._tally.transitions.append(
            {
                "at_s": round(transition.at - self._t0, 4),
                "from": transition.from_state.value,
                "to": transition.to_state.value,
                "trigger": transition.trigger.value,
            }
        )
        if transition.to_state is BreakerState.OPEN:
            self._breaker_opened.set()

    def on_budget_refusal(self, target: str) -> None:
        self._tally.budget_refusals += 1


@dataclass
class RunControl:
    """How a run is told to stop early and where it publishes live counts."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    publish: Callable[[LoadTally], None] | None = None
    start_at_wall: float | None = None  # shared start time of all workers (time.time())
    worker: int = 0


async def run_load(plan: LoadPlan, control: RunControl | None = None) -> LoadTally:
    """Drive one worker's share of the plan and return what it saw."""
    control = control or RunControl()
    loop = asyncio.get_running_loop()
    tally = LoadTally()
    # perf_counter, not loop.time(): uvloop's loop clock moves in whole milliseconds.
    clock = time.perf_counter
    if control.start_at_wall is not None:
        t0 = clock() + max(0.0, control.start_at_wall - time.time())
    else:
        t0 = clock() + 0.01
    end_at = t0 + plan.duration_s
    interval = 1.0 / plan.rate
    breaker_opened = asyncio.Event()
    keys = KeyChooser(plan, control.worker)
    base = plan.url.rstrip("/")
    inflight: set[asyncio.Task[None]] = set()

    async with ResilientClient(
        plan.policy(),
        pool_size=plan.pool_size,
        listeners=[_TallyListener(tally, t0, breaker_opened)],
    ) as client:

        async def call(scheduled: float, key: str, path: str, expected: str) -> None:
            try:
                result = await client.get(
                    base, path, verify=answer_verifier(key, plan.rounds, expected)
                )
                status = result.status
                if status is CallStatus.WRONG:
                    tally.wrong_by_node[answering_node(result.response)] += 1
                tally.retries += result.retries
                tally.hedges += result.hedged
            except asyncio.CancelledError:
                status = CallStatus.CANCELLED
            tally.record_result(status, (clock() - scheduled) * 1000.0)

        async def publish_progress() -> None:
            assert control.publish is not None
            while True:
                control.publish(tally)
                await asyncio.sleep(PUBLISH_EVERY_S)

        publisher = loop.create_task(publish_progress()) if control.publish else None
        k = 0
        while True:
            i = control.worker + k * plan.workers
            scheduled = t0 + i * interval
            if (plan.count is not None and i >= plan.count) or scheduled >= end_at:
                break
            now = clock()
            while scheduled > now and not control.stop.is_set():
                # A plain sleep is the cheapest wait; capped so a stop request at a low
                # rate is still noticed within MAX_IDLE_S.
                await asyncio.sleep(min(scheduled - now, MAX_IDLE_S))
                now = clock()
            if control.stop.is_set():
                tally.partial = True
                tally.stop_reason = "interrupted"
                break
            if breaker_opened.is_set() and not client.reached(base):
                tally.unreachable = True
                tally.stop_reason = (
                    f"target unreachable: the circuit breaker opened with no answer from {base}"
                )
                break
            key, path, expected = keys.next()
            tally.record_send(now - t0, now - scheduled)
            task = loop.create_task(call(scheduled, key, path, expected))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            k += 1

        if inflight:
            drain = plan.drain_s()
            if control.stop.is_set():
                drain = min(drain, INTERRUPT_DRAIN_S)
            _, late = await asyncio.wait(
                set(inflight), timeout=drain, return_when=asyncio.ALL_COMPLETED
            )
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        tally.contacted = client.reached(base)
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
    tally.elapsed_s = max(0.0, clock() - t0)
    if tally.sent and not tally.contacted:
        tally.unreachable = True
        if tally.stop_reason == "completed":
            tally.stop_reason = f"target unreachable: no answer from {base}"
    if control.publish is not None:
        control.publish(tally)
    return tally


def run_load_blocking(plan: LoadPlan, control_factory: Callable[[], RunControl]) -> LoadTally:
    """Run one worker's share on uvloop; SIGINT and SIGTERM stop it early (partial)."""

    async def main() -> LoadTally:
        control = control_factory()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, control.stop.set)
        if _early_stop_requested:
            control.stop.set()
        try:
            return await run_load(plan, control)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


#: Set by a signal that arrives before a worker's event loop takes over signal handling.
_early_stop_requested = False


def _note_early_stop(signum: int, frame: object) -> None:
    global _early_stop_requested
    _early_stop_requested = True


COUNT_FIELDS = 4  # sent, correct, wrong, failed


def _worker_main(
    plan: LoadPlan,
    worker: int,
    start_at: Any,
    go: Any,
    counts: Any,
    results: Any,
) -> None:
    """A worker process: wait for the shared start time, run, send the tally back."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_early_stop)
    go.wait()

    def publish(tally: LoadTally) -> None:
        base = worker * COUNT_FIELDS
        counts[base : base + COUNT_FIELDS] = [tally.sent, tally.correct, tally.wrong, tally.failed]

    def control() -> RunControl:
        return RunControl(publish=publish, start_at_wall=start_at.value, worker=worker)

    try:
        tally = run_load_blocking(plan, control)
    except BaseException as err:  # the parent reports it instead of waiting forever
        results.put((worker, None, f"{type(err).__name__}: {err}"))
        raise
    results.put((worker, tally, None))


class WorkerFailed(RuntimeError):
    """A load worker process died or raised."""


def run_load_in_workers(
    plan: LoadPlan, on_progress: Callable[[list[int]], None] | None = None
) -> LoadTally:
    """Split the plan over `plan.workers` forked processes and merge their tallies."""
    ctx = multiprocessing.get_context("fork")
    n = plan.workers
    counts = ctx.Array("q", n * COUNT_FIELDS, lock=False)
    start_at = ctx.Value("d", 0.0, lock=False)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(plan, w, start_at, go, counts, results),
            name=f"twlb-load-{w}",
            daemon=True,
        )
        for w in range(n)
    ]
    interrupted = False

    def forward(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        # Forked workers are ready almost at once; a short lead puts every first send
        # on the same schedule.
        start_at.value = time.time() + 0.2
        go.set()
        bound = time.monotonic() + 0.2 + plan.duration_s + plan.drain_s() + 30.0
        merged = LoadTally()
        received = 0
        errors: list[str] = []
        while received < n and time.monotonic() < bound:
            if on_progress is not None:
                on_progress(list(counts))
            try:
                _, tally, error = results.get(timeout=PUBLISH_EVERY_S)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            received += 1
            if error is not None:
                errors.append(error)
            else:
                merged.merge(tally)
        if on_progress is not None:
            on_progress(list(counts))
        if errors or received < n:
            raise WorkerFailed(
                "; ".join(errors) or f"only {received} of {n} load workers reported back"
            )
        if interrupted and not merged.partial:
            merged.partial = True
            merged.stop_reason = "interrupted"
        return merged
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for s, handler in previous.items():
            signal.signal(s, handler)
