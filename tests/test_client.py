"""The resilient client against real `twlb backend` processes on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from test_client_support import ControlledNode, node_fixture  # noqa: F401  (the node fixture)
from twlb.client.breaker import BreakerConfig, BreakerState, BreakerTransition
from twlb.client.client import CallStatus, ClientListener, ClientPolicy, ResilientClient
from twlb.client.load import answer_verifier
from twlb.processes.managed import free_port

from twlb.work import digest


def _work(key: str) -> tuple[str, object]:
    return f"/work?key={key}&rounds=1", answer_verifier(key, 1, digest(key, 1))


class ManualClock:
    """The client's clock, moved by the test instead of by sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class Recorder(ClientListener):
    def __init__(self) -> None:
        self.transitions: list[BreakerTransition] = []
        self.retries: list[tuple[int, CallStatus]] = []
        self.refusals = 0
        self.hedges = 0

    def on_breaker_transition(self, target: str, transition: BreakerTransition) -> None:
        self.transitions.append(transition)

    def on_retry(self, target: str, attempt: int, status: CallStatus, wait_s: float) -> None:
        self.retries.append((attempt, status))

    def on_budget_refusal(self, target: str) -> None:
        self.refusals += 1

    def on_hedge(self, target: str, delay_s: float) -> None:
        self.hedges += 1


async def test_basic_policy_tries_once_and_reports_the_5xx(node: ControlledNode) -> None:
    node.set_fault(type="error", errorStatus=503)
    url = node.url
    async with ResilientClient(ClientPolicy.basic(timeout_s=1.0)) as client:
        result = await client.get(url, "/work?key=a")
    assert result.status is CallStatus.HTTP_5XX
    assert (result.attempts, result.retries) == (1, 0)
    assert result.response is not None and result.response.status_code == 503
    assert client.breaker(url) is None


async def test_basic_policy_reports_a_timeout_not_a_deadline(node: ControlledNode) -> None:
    node.set_fault(type="delay", delayMs=2000)
    async with ResilientClient(ClientPolicy.basic(timeout_s=0.2)) as client:
        result = await client.get(node.url, "/work?key=slow")
    assert result.status is CallStatus.TIMEOUT
    # Real time (a real node holds the answer 2 s): the 0.2 s timeout cut the call, long
    # before the answer; the upper margin is for a busy machine, not a measurement. The
    # lower one allows uvloop's millisecond timer granularity.
    assert 0.19 <= result.elapsed_s < 1.5


async def test_a_callers_own_httpx_client_is_used_as_given(node: ControlledNode) -> None:
    node.set_fault(type="error", probability=1.0)
    seen: list[str] = []

    async def on_request(request: httpx.Request) -> None:
        seen.append(request.headers["x-caller"])

    policy = ClientPolicy(max_attempts=2, backoff_base_s=0.001, breaker=None)
    async with httpx.AsyncClient(
        headers={"x-caller": "svc"}, event_hooks={"request": [on_request]}, trust_env=False
    ) as http:
        async with ResilientClient(policy, http=http) as client:
            result = await client.get(node.url, "/work?key=own")
        assert not http.is_closed  # the caller's client stays the caller's to close
    node.set_fault(type="benign")
    assert result.status is CallStatus.HTTP_5XX and result.retries == 1
    assert seen == ["svc", "svc"]


async def test_retry_budget_caps_retries_against_a_failing_backend(node: ControlledNode) -> None:
    node.set_fault(type="error")
    url = node.url
    registry = CollectorRegistry()
    recorder = Recorder()
    # No share of traffic, 1 retry/s for 10 s: exactly 10 retries in the whole test.
    policy = ClientPolicy(
        max_attempts=5,
        backoff_base_s=0.001,
        backoff_max_s=0.002,
        budget_ratio=0.0,
        budget_min_per_s=1.0,
        budget_ttl_s=10.0,
        breaker=None,
    )
    async with ResilientClient(policy, registry=registry, listeners=[recorder]) as client:
        results = [await client.get(url, "/work?key=a") for _ in range(20)]
    assert all(r.status is CallStatus.HTTP_5XX for r in results)
    assert [r.retries for r in results[:3]] == [4, 4, 2]
    assert sum(r.retries for r in results) == 10
    assert _metric(registry, "twlb_client_retries_total", target=url) == 10
    # The third call is refused its third retry, every later call its first.
    assert recorder.refusals == 18
    assert _metric(registry, "twlb_client_budget_refusals_total", target=url) == 18
    assert _metric(registry, "twlb_client_requests_total", target=url, outcome="http_5xx") == 20


async def test_retries_recover_most_calls_from_a_flaky_backend(node: ControlledNode) -> None:
    node.set_fault(type="error", probability=0.5)
    url = node.url
    policy = ClientPolicy(max_attempts=5, backoff_base_s=0.001, breaker=None, budget_ratio=10.0)
    basic_ok = resilient_ok = 0
    async with ResilientClient(ClientPolicy.basic()) as basic:
        for i in range(40):
            basic_ok += (await basic.get(url, f"/work?key=b{i}")).ok
    async with ResilientClient(policy) as client:
        results = [await client.get(url, f"/work?key=r{i}") for i in range(40)]
    resilient_ok = sum(r.ok for r in results)
    assert 8 <= basic_ok <= 32
    assert resilient_ok >= 37
    assert any(r.ok and r.retries > 0 for r in results)


async def test_deadline_bounds_every_call_against_a_delayed_backend(
    node: ControlledNode,
) -> None:
    node.set_fault(type="delay", delayMs=3000)
    url = node.url
    deadline = 0.6
    policy = ClientPolicy(
        timeout_s=0.25, deadline_s=deadline, max_attempts=10, backoff_base_s=0.01, breaker=None
    )
    async with ResilientClient(policy) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(client.get(url, f"/work?key=d{i}") for i in range(8)))
        wall = time.perf_counter() - started
    # Real time (the node answers after 3 s; ten tries of 0.25 s would take 2.5 s): ending
    # within a second of the 0.6 s deadline shows the deadline ended every call; the margin
    # is for a busy machine, not a measurement.
    for r in results:
        assert r.status in (CallStatus.TIMEOUT, CallStatus.DEADLINE)
        assert r.elapsed_s < deadline + 1.0, r
        assert r.retries >= 1  # it did retry within the deadline
    assert wall < deadline + 1.0


async def test_hedge_answers_when_the_first_try_is_slow(node: ControlledNode) -> None:
    node.set_fault(type="delay", probability=0.15, delayMs=400)
    url = node.url
    recorder = Recorder()
    registry = CollectorRegistry()
    policy = ClientPolicy(
        timeout_s=2.0, deadline_s=3.0, hedge_quantile=0.5, hedge_min_samples=10, breaker=None
    )
    async with ResilientClient(policy, registry=registry, listeners=[recorder]) as client:
        warm = 0
        while len(client.target(url).latencies) < policy.hedge_min_samples:
            await client.get(url, f"/work?key=w{warm}")
            warm += 1
        results = [await client.get(url, f"/work?key=h{i}") for i in range(30)]
    assert all(r.ok for r in results)
    hedged = [r for r in results if r.hedged]
    assert len(hedged) >= 3
    assert recorder.hedges == len(hedged)
    assert _metric(registry, "twlb_client_hedges_total", target=url) == len(hedged)
    # A hedged call is answered by the fast try, not after the 400 ms delay: a call the
    # delayed try answered took at least 0.4 s (both tries of a call are delayed now and
    # then, so allow a few).
    slow = [r for r in results if r.elapsed_s >= 0.4]
    assert len(slow) <= 4, [round(r.elapsed_s, 3) for r in results]
    assert all(r.attempts == 2 for r in hedged)


async def test_wrong_answers_from_a_byzantine_backend_count_as_failures(
    node: ControlledNode,
) -> None:
    node.set_fault(type="byzantine")
    url = node.url
    registry = CollectorRegistry()
    recorder = Recorder()
    policy = ClientPolicy(
        max_attempts=2,
        backoff_base_s=0.001,
        breaker=BreakerConfig(minimum_calls=6, window_size=10, wait_in_open_s=30.0),
    )
    async with ResilientClient(policy, registry=registry, listeners=[recorder]) as client:
        results = []
        for i in range(10):
            path, verify = _work(f"z{i}")
            results.append(await client.get(url, path, verify=verify))
    statuses = [r.status for r in results]
    assert statuses[0] is CallStatus.WRONG
    assert results[0].response is not None and results[0].response.status_code == 200
    assert all(s in (CallStatus.WRONG, CallStatus.BREAKER_OPEN) for s in statuses)
    assert statuses[-1] is CallStatus.BREAKER_OPEN  # wrong answers opened the breaker
    assert recorder.retries and all(s is CallStatus.WRONG for _, s in recorder.retries)
    wrong = _metric(registry, "twlb_client_requests_total", target=url, outcome="wrong")
    assert wrong == statuses.count(CallStatus.WRONG) >= 3
    assert (
        _metric(
            registry,
            "twlb_client_breaker_transitions_total",
            target=url,
            **{"from": "closed"},
            to="open",
        )
        == 1
    )


async def test_breaker_fails_fast_once_a_dead_target_opens_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    recorder = Recorder()
    policy = ClientPolicy(
        max_attempts=1, breaker=BreakerConfig(minimum_calls=5, window_size=5, wait_in_open_s=60)
    )
    clock = ManualClock()
    async with ResilientClient(policy, listeners=[recorder], clock=clock) as client:
        first = [await client.get(url, "/work?key=a") for _ in range(5)]
        clock.advance(59.9)  # still inside the breaker's 60 s wait
        later = [await client.get(url, "/work?key=a") for _ in range(50)]
    assert all(r.status is CallStatus.CONNECT_ERROR for r in first)
    assert first[0].error
    # Refused without a try and without waiting: the clock stood still during the calls.
    assert all(r.status is CallStatus.BREAKER_OPEN and r.attempts == 0 for r in later)
    assert all(r.elapsed_s == 0.0 and r.retries == 0 for r in later)
    assert [(t.from_state, t.to_state) for t in recorder.transitions] == [
        (BreakerState.CLOSED, BreakerState.OPEN)
    ]


async def test_breaker_closes_again_after_the_backend_recovers(node: ControlledNode) -> None:
    node.set_fault(type="error")
    url = node.url
    recorder = Recorder()
    policy = ClientPolicy(
        max_attempts=1,
        breaker=BreakerConfig(
            minimum_calls=4, window_size=4, wait_in_open_s=1.5, permitted_calls_in_half_open=3
        ),
    )
    clock = ManualClock()
    async with ResilientClient(policy, listeners=[recorder], clock=clock) as client:
        for _ in range(4):
            await client.get(url, "/work?key=a")
        assert client.breaker(url).state is BreakerState.OPEN
        node.set_fault(type="benign")
        clock.advance(1.49)
        assert (await client.get(url, "/work?key=a")).status is CallStatus.BREAKER_OPEN
        clock.advance(0.01)  # the 1.5 s wait is over: the next calls are trials
        trials = [await client.get(url, "/work?key=a") for _ in range(3)]
    assert all(t.ok for t in trials)
    assert client.breaker(url).state is BreakerState.CLOSED
    assert [(t.from_state.value, t.to_state.value) for t in recorder.transitions] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"deadline_s": -1}, "deadline_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"hedge_quantile": 1.0}, "hedge_quantile"),
    ],
)
def test_bad_policy_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ClientPolicy(**kwargs)
