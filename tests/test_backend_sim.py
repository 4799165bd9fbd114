"""The backend's sans-IO cores, driven with explicit `now` values: faults, simulation, query."""

from __future__ import annotations

import random
import statistics
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from twlb.backend.app import (
    LATENCY_BUCKETS_S,
    FieldProblem,
    UndecodableQuery,
    parse_work_query,
    query_pairs,
    timer_pause,
)
from twlb.backend.faults import NO_FAULT, FaultAction, FaultInjector
from twlb.backend.simulation import NodeProfile, NodeSimulation

from twlb.plain_metrics import PlainHistogram
from twlb.spec import FaultSpec, FaultType
from twlb.work import KEY_MAX_LEN, ROUNDS_MAX


def injector(seed: int = 0, since: float = 0.0, **fault: object) -> FaultInjector:
    return FaultInjector(FaultSpec.model_validate(fault), random.Random(seed), since)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"type": "delay", "delayMs": 250}, (FaultAction.DELAY, 0.25, 200)),
        ({"type": "lie-latency", "delayMs": 80}, (FaultAction.LIE_LATENCY, 0.08, 200)),
        ({"type": "error", "errorStatus": 503}, (FaultAction.ERROR, 0.0, 503)),
        ({"type": "crash"}, (FaultAction.CRASH, 0.0, 200)),
        ({"type": "byzantine"}, (FaultAction.BYZANTINE, 0.0, 200)),
    ],
)
def test_each_fault_type_decides_its_action_with_its_parameters(
    fault: dict[str, object], expected: tuple[FaultAction, float, int]
) -> None:
    d = injector(**fault).decide(1.0)
    assert (d.action, d.delay_s, d.status) == expected


def test_benign_node_never_faults() -> None:
    inj = injector(type="benign")
    assert all(inj.decide(t * 0.01) is NO_FAULT for t in range(1000))


def test_probability_zero_never_faults() -> None:
    inj = injector(type="error", probability=0.0)
    assert all(inj.decide(t * 0.01) is NO_FAULT for t in range(1000))


def test_error_at_probability_0_3_acts_on_about_30_percent_of_requests() -> None:
    inj = injector(seed=3, type="error", probability=0.3)
    n = 10_000
    share = sum(inj.decide(i * 0.001).action is FaultAction.ERROR for i in range(n)) / n
    # Binomial sd is 0.0046 at n=10,000: 0.02 is over four of them.
    assert abs(share - 0.3) < 0.02


def test_same_seed_and_times_give_the_same_faults() -> None:
    times = [i * 0.37 for i in range(500)]
    a = injector(seed=11, type="byzantine", probability=0.4)
    b = injector(seed=11, type="byzantine", probability=0.4)
    c = injector(seed=12, type="byzantine", probability=0.4)
    da = [a.decide(t) for t in times]
    assert da == [b.decide(t) for t in times]
    assert da != [c.decide(t) for t in times]


def test_flapping_alternates_healthy_and_faulty_periods_from_its_start() -> None:
    inj = injector(since=100.0, type="flapping", periodS=2.0, flapType="byzantine")
    for t, faulty in [(100.0, False), (101.9, False), (102.1, True), (103.9, True),
                      (104.1, False), (106.5, True), (99.0, False)]:  # fmt: skip
        assert inj.in_faulty_period(t) is faulty, t
        expected = FaultAction.BYZANTINE if faulty else FaultAction.NONE
        assert inj.decide(t).action is expected, t


def test_switching_the_fault_restarts_flapping_periods_and_changes_the_action() -> None:
    inj = injector(type="flapping", periodS=1.0, flapType="error")
    assert inj.decide(1.5).action is FaultAction.ERROR
    inj.switch(FaultSpec(type=FaultType.FLAPPING, period_s=1.0, flap_type=FaultType.DELAY), 1.5)
    assert inj.decide(2.0).action is FaultAction.NONE  # healthy first half-period again
    assert inj.decide(2.6).action is FaultAction.DELAY
    inj.switch(FaultSpec(type=FaultType.BENIGN), 3.0)
    assert inj.decide(3.6) is NO_FAULT


def test_lie_latency_hides_its_delay_and_reports_itself_benign() -> None:
    liar = injector(type="lie-latency", delayMs=300)
    assert liar.reported_type is FaultType.BENIGN
    assert liar.decide(0.0).hidden_delay_s == pytest.approx(0.3)
    honest = injector(type="delay", delayMs=300)
    assert honest.reported_type is FaultType.DELAY
    assert honest.decide(0.0).hidden_delay_s == 0.0


def test_wrong_digest_is_plausible_different_and_seeded() -> None:
    true = "ab" * 32
    a, b = injector(seed=5, type="byzantine"), injector(seed=5, type="byzantine")
    wrong = [a.wrong_digest(true) for _ in range(50)]
    assert wrong == [b.wrong_digest(true) for _ in range(50)]
    for w in wrong:
        assert w != true and len(w) == 64 and w == w.lower()
        int(w, 16)


# --- simulation ---------------------------------------------------------------------------


def test_same_seed_and_times_give_the_same_samples_and_conditions() -> None:
    times = [i * 0.013 for i in range(3000)]
    a, b = NodeSimulation(42, 0.0), NodeSimulation(42, 0.0)
    assert [a.sample(t) for t in times] == [b.sample(t) for t in times]
    assert [a.conditions(t) for t in times[::50]] == [b.conditions(t) for t in times[::50]]
    other = NodeSimulation(43, 0.0)
    assert [other.sample(t) for t in times[:100]] != [a.sample(t) for t in times[:100]]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    steps=st.lists(st.floats(0.0, 30.0), min_size=1, max_size=40),
)
def test_any_seed_replays_exactly(seed: int, steps: list[float]) -> None:
    times = [sum(steps[: i + 1]) for i in range(len(steps))]
    a, b = NodeSimulation(seed, 10.0), NodeSimulation(seed, 10.0)
    assert [(a.sample(t), a.conditions(t)) for t in times] == [
        (b.sample(t), b.conditions(t)) for t in times
    ]


def test_conditions_depend_only_on_seed_and_time_not_on_request_history() -> None:
    busy, idle = NodeSimulation(7, 0.0), NodeSimulation(7, 0.0)
    for i in range(2000):
        busy.sample(i * 0.05)
    for t in (500.0, 3.0, 77.7, 1200.0):  # any order: a pure function of time
        assert busy.conditions(t) == idle.conditions(t)


def test_load_follows_a_sinusoid_with_spikes_and_moves_cpu_and_memory() -> None:
    sim = NodeSimulation(9, 0.0)
    p = sim.profile
    times = [i * 0.5 for i in range(7200)]  # one hour
    loads = [sim.load(t) for t in times]
    # Over one period the wave alone spans twice its amplitude.
    one_period = loads[: int(p.load_period_s / 0.5)]
    assert max(one_period) - min(one_period) >= 1.8 * p.load_amplitude
    # Spikes push load above anything the sinusoid can reach.
    assert max(loads) > 1.0 + p.load_amplitude + 0.3
    conds = [sim.conditions(t) for t in times[::20]]
    assert all(0.0 <= c.cpu_utilization <= 1.0 for c in conds)
    assert len({round(c.cpu_utilization, 3) for c in conds}) > 50
    assert all(c.memory_bytes > 50 * 2**20 for c in conds)
    assert len({c.memory_bytes for c in conds}) > 50
    assert all(c.network_latency_s == p.network_latency_s for c in conds)


def test_default_node_is_usable_small_latency_with_jitter_and_rare_loss() -> None:
    sim = NodeSimulation(1, 0.0)
    samples = [sim.sample(i * 0.02) for i in range(20_000)]
    latencies = [s.latency_s for s in samples]
    assert 0.3e-3 < statistics.median(latencies) < 5e-3
    assert statistics.stdev(latencies) > 0.0
    dropped = sum(s.dropped for s in samples) / len(samples)
    assert 0.0 < dropped < 0.01


def test_nodes_differ_by_seed() -> None:
    profiles = {NodeProfile.from_seed(s) for s in range(20)}
    assert len({p.base_latency_s for p in profiles}) == 20


def test_packet_loss_override_and_disabled_simulation() -> None:
    lossy = NodeSimulation(1, 0.0, packet_loss=0.25)
    share = sum(lossy.sample(i * 0.01).dropped for i in range(8000)) / 8000
    assert abs(share - 0.25) < 0.03
    lossless = NodeSimulation(1, 0.0, packet_loss=0.0)
    assert not any(lossless.sample(i * 0.01).dropped for i in range(5000))
    off = NodeSimulation(1, 0.0, enabled=False)
    assert all(off.sample(i * 0.01).latency_s == 0.0 for i in range(1000))
    assert not any(off.sample(i * 0.01).dropped for i in range(1000))
    off_lossy = NodeSimulation(1, 0.0, enabled=False, packet_loss=1.0)
    assert off_lossy.sample(0.0).dropped
    with pytest.raises(ValueError, match="packet_loss"):
        NodeSimulation(1, 0.0, packet_loss=1.5)


# --- the work query -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs", "Cf", "Co", "Cn")),
        min_size=1,
        max_size=KEY_MAX_LEN,
    ),
    rounds=st.integers(1, ROUNDS_MAX),
)
def test_every_valid_query_parses_back(key: str, rounds: int) -> None:
    qs = urlencode({"key": key, "rounds": rounds}).encode()
    assert parse_work_query(qs) == (key, rounds)


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        (b"", {"key"}),
        (b"key=", {"key"}),
        (b"key=" + b"a" * 257, {"key"}),
        (b"key=a%00b", {"key"}),
        (b"key=a&rounds=x", {"rounds"}),
        (b"key=a&rounds=-1", {"rounds"}),
        (b"key=a&rounds=0", {"rounds"}),
        (b"key=a&rounds=10001", {"rounds"}),
        (b"key=a&rounds=1.5", {"rounds"}),
        (b"key=a&key=b", {"key"}),
        (b"key=a&colour=red", {"colour"}),
        (b"rounds=x", {"key", "rounds"}),
        (b"key=a&rounds=" + b"7" * 5000, {"rounds"}),
        (b"key=%ff%fe", {"key"}),
        (b"key=\xff", {"key"}),
        (b"k%ffy=a", {"k%ffy"}),
    ],
)
def test_malformed_queries_name_their_fields(query: bytes, fields: set[str]) -> None:
    problems = parse_work_query(query)
    assert isinstance(problems, list)
    assert {p.field for p in problems} == fields
    assert all(isinstance(p, FieldProblem) and p.message for p in problems)


def test_rounds_defaults_to_one() -> None:
    assert parse_work_query(b"key=hello") == ("hello", 1)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60))
def test_query_fast_path_splits_exactly_like_parse_qsl(text: str) -> None:
    try:
        expected = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(UndecodableQuery):
            query_pairs(text.encode())
    else:
        assert query_pairs(text.encode()) == expected


def test_rounds_with_leading_zeros_is_the_number() -> None:
    assert parse_work_query(b"key=a&rounds=" + b"0" * 5000 + b"7") == ("a", 7)


def test_a_raw_utf8_key_is_decoded_as_utf8() -> None:
    assert parse_work_query("key=été".encode()) == ("été", 1)


def test_timer_pauses_are_whole_milliseconds_keeping_the_mean() -> None:
    rng = random.Random(0)
    for seconds in (0.0004, 0.0016, 0.150):
        pauses = [timer_pause(seconds, rng) for _ in range(20_000)]
        assert {round(p * 1000) for p in pauses} <= {int(seconds * 1000), int(seconds * 1000) + 1}
        assert statistics.fmean(pauses) == pytest.approx(seconds, abs=0.00003)
    assert timer_pause(0.0, rng) == 0.0


# --- the node's lock-free latency histogram -----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 60.0), max_size=50))
def test_plain_histogram_exposes_what_a_prometheus_histogram_would(values: list[float]) -> None:
    registry = CollectorRegistry()
    reference = Histogram("h", "h", buckets=LATENCY_BUCKETS_S, registry=registry)
    plain = PlainHistogram(LATENCY_BUCKETS_S)
    for v in [*values, *LATENCY_BUCKETS_S]:  # the bounds themselves: `le` is inclusive
        reference.observe(v)
        plain.observe(v)
    expected = {
        s.labels["le"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "h_bucket"
    }
    assert dict(plain.cumulative_buckets()) == expected
    assert plain.count == len(values) + len(LATENCY_BUCKETS_S)
    assert plain.sum == pytest.approx(registry.get_sample_value("h_sum"))
