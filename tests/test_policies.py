"""Routing policies: each policy's decisions, driven with fake `now` values."""

from __future__ import annotations

from collections import Counter

import pytest
from twlb.balancer.policies import (
    P2C_ABOVE,
    POLICIES,
    ConsistentHash,
    OutlierEjection,
    PeakEwma,
    WeightedRoundRobin,
    make_policy,
    smooth_weighted_pick,
)
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine, TrustEvent

from twlb.outcome import Outcome
from twlb.spec import NodeClass, PolicyName

SIX = [f"http://127.0.0.1:{9000 + i}" for i in range(6)]


def _built(name: PolicyName | str, backends: list[str], **kwargs):
    policy = make_policy(name, **kwargs)
    policy.set_backends(backends, 0.0)
    return policy


def _fail(policy, backend: str, now: float, times: int, outcome: Outcome = Outcome.ERROR) -> None:
    for _ in range(times):
        policy.on_start(backend, now)
        policy.on_end(backend, now, outcome, 0.001)


# -- make_policy -----------------------------------------------------------------------


def test_every_policy_name_builds_and_names_itself() -> None:
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(["a", "b"], 0.0)
    assert set(POLICIES) == set(PolicyName)
    for name in PolicyName:
        policy = make_policy(name, trust_engine=engine, truth=lambda b: NodeClass.HEALTHY)
        assert policy.name is name
        policy.set_backends(["a", "b"], 0.0)
        assert policy.pick([], 0.0) is None
        assert policy.pick(["a", "b"], 0.0) in {"a", "b"}


def test_unknown_policy_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'fastest'; choose one of round-robin"):
        make_policy("fastest")


def test_unknown_option_is_refused_with_the_policy_own_options() -> None:
    with pytest.raises(ValueError, match=r"no option \['consecutive_5xx'\].*decay_s"):
        make_policy("p2c-ewma", consecutive_5xx=3)


def test_trust_and_oracle_need_their_inputs() -> None:
    with pytest.raises(ValueError, match="trust_engine"):
        make_policy("trust")
    with pytest.raises(ValueError, match="ground truth"):
        make_policy("oracle")


# -- round robin, random, least connections --------------------------------------------


def test_round_robin_takes_candidates_in_turn() -> None:
    policy = _built("round-robin", ["a", "b", "c"])
    assert [policy.pick(["a", "b", "c"], 0.0) for _ in range(6)] == list("abcabc")


def test_random_is_reproducible_by_seed_and_covers_every_candidate() -> None:
    one = _built("random", SIX, seed=7)
    two = _built("random", SIX, seed=7)
    picks = [one.pick(SIX, 0.0) for _ in range(600)]
    assert picks == [two.pick(SIX, 0.0) for _ in range(600)]
    counts = Counter(picks)
    assert set(counts) == set(SIX)
    assert min(counts.values()) > 60


def test_least_connections_prefers_fewest_in_flight_and_rotates_ties() -> None:
    policy = _built("least-connections", ["a", "b", "c"])
    policy.on_start("a", 0.0)
    policy.on_start("a", 0.0)
    policy.on_start("b", 0.0)
    assert policy.pick(["a", "b", "c"], 0.0) == "c"
    policy.on_start("c", 0.0)
    # b and c tie at one in flight: taken in turn
    assert {policy.pick(["a", "b", "c"], 0.0) for _ in range(2)} == {"b", "c"}
    policy.on_end("a", 1.0, Outcome.SUCCESS, 0.01)
    policy.on_end("a", 1.0, Outcome.SUCCESS, 0.01)
    assert policy.pick(["a", "b", "c"], 1.0) == "a"
    assert policy.describe("a") == {"inflight": 0}


# -- weighted round robin ----------------------------------------------------------------


def test_smooth_wrr_gives_nginx_sequence_for_weights_5_1_1() -> None:
    policy = _built("weighted-round-robin", ["a", "b", "c"], weights={"a": 5, "b": 1, "c": 1})
    picks = [policy.pick(["a", "b", "c"], 0.0) for _ in range(14)]
    assert "".join(picks) == "aabacaa" * 2


def test_wrr_lowers_effective_weight_after_a_failure_and_recovers() -> None:
    policy = _built("weighted-round-robin", ["a", "b"], weights={"a": 3, "b": 1})
    assert isinstance(policy, WeightedRoundRobin)
    policy.on_start("a", 0.0)
    policy.on_end("a", 0.0, Outcome.CONNECT_ERROR, 0.001)
    assert policy.describe("a")["effective_weight"] == 0
    policy.pick(["a", "b"], 0.0)
    assert policy.describe("a")["effective_weight"] == 1
    for _ in range(5):
        policy.pick(["a", "b"], 0.0)
    assert policy.describe("a")["effective_weight"] == 3


def test_wrr_refuses_non_positive_weights() -> None:
    with pytest.raises(ValueError, match="weight of a must be positive"):
        make_policy("weighted-round-robin", weights={"a": 0})


# -- consistent hashing ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_consistent_hash_moves_about_one_nth_of_keys_when_a_node_joins(algorithm: str) -> None:
    keys = [f"user-{i}" for i in range(10_000)]
    five, six = SIX[:5], SIX
    policy = _built("consistent-hash", five, hash_algorithm=algorithm)
    before = {k: policy.pick(five, 0.0, key=k) for k in keys}
    policy.set_backends(six, 1.0)
    after = {k: policy.pick(six, 1.0, key=k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert 0.10 < len(moved) / len(keys) < 0.25  # about 1/6
    assert {after[k] for k in moved} == {SIX[5]}  # keys move only to the newcomer


def test_consistent_hash_skips_a_non_candidate_clockwise() -> None:
    policy = _built("consistent-hash", SIX)
    assert isinstance(policy, ConsistentHash)
    for i in range(60):
        key = f"k{i}"
        owner = policy.pick(SIX, 0.0, key=key)
        others = [b for b in SIX if b != owner]
        fallback = policy.pick(others, 0.0, key=key)
        # Same answer as a ring that never had the owner: only the owner's keys move.
        alone = _built("consistent-hash", others)
        assert fallback == alone.pick(others, 0.0, key=key)


def test_consistent_hash_without_key_spreads_round_robin() -> None:
    policy = _built("consistent-hash", ["a", "b", "c"])
    assert [policy.pick(["a", "b", "c"], 0.0) for _ in range(3)] == ["a", "b", "c"]


def test_consistent_hash_refuses_unknown_algorithm_and_shares_the_ring() -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm 'crc32'"):
        make_policy("consistent-hash", hash_algorithm="crc32")
    policy = _built("consistent-hash", SIX)
    shares = [policy.describe(b)["ring_share"] for b in SIX]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert min(shares) > 0.08


# -- p2c peak EWMA -----------------------------------------------------------------------


def _observe(policy, backend: str, now: float, latency: float, outcome=Outcome.SUCCESS) -> None:
    policy.on_start(backend, now)
    policy.on_end(backend, now, outcome, latency)


def test_p2c_prefers_the_faster_node() -> None:
    policy = _built("p2c-ewma", ["fast", "slow"], seed=3)
    now = 0.0
    for _ in range(20):
        now += 0.05
        _observe(policy, "fast", now, 0.005)
        _observe(policy, "slow", now, 0.200)
    picks = Counter(policy.pick(["fast", "slow"], now) for _ in range(100))
    assert picks == {"fast": 100}


def test_p2c_weighs_latency_by_requests_in_flight() -> None:
    policy = _built("p2c-ewma", ["a", "b"])
    _observe(policy, "a", 1.0, 0.010)
    _observe(policy, "b", 1.0, 0.015)
    assert policy.pick(["a", "b"], 1.0) == "a"
    for _ in range(3):
        policy.on_start("a", 1.0)
    assert policy.pick(["a", "b"], 1.0) == "b"  # 0.010 * 4 > 0.015 * 1


def test_peak_ewma_jumps_up_at_once_and_decays_with_time() -> None:
    policy = _built("p2c-ewma", ["a"], decay_s=10.0)
    assert isinstance(policy, PeakEwma)
    _observe(policy, "a", 1.0, 0.010)
    _observe(policy, "a", 1.0, 0.500)  # a slow sample: the peak is taken at once
    assert policy.describe("a")["ewma_s"] == pytest.approx(0.5)
    _observe(policy, "a", 11.0, 0.010)  # one time constant later, a fast sample
    assert policy.describe("a")["ewma_s"] == pytest.approx(0.5 * 0.3679 + 0.010 * 0.6321, rel=1e-3)
    assert policy.load("a", 61.0) < 0.01  # idle for five time constants


def test_p2c_counts_a_failure_as_a_penalty_latency() -> None:
    policy = _built("p2c-ewma", ["a", "b"], failure_penalty_s=1.0)
    _observe(policy, "a", 1.0, 0.001, Outcome.ERROR)  # a fast 500 is not a fast answer
    _observe(policy, "b", 1.0, 0.050)
    assert policy.describe("a")["ewma_s"] == pytest.approx(1.0)
    assert policy.pick(["a", "b"], 1.0) == "b"


# -- outlier ejection (Envoy) ------------------------------------------------------------


def _ticking(policy, start: float, end: float, step: float = 0.5) -> None:
    t = start
    while t <= end + 1e-9:
        policy.tick(t)
        t += step


def test_outlier_ejection_after_five_consecutive_5xx_then_back_after_base_time() -> None:
    policy = _built("outlier-ejection", SIX)
    assert isinstance(policy, OutlierEjection)
    bad = SIX[0]
    _fail(policy, bad, 1.0, 4)
    _observe(policy, bad, 1.0, 0.01)  # a success resets the run
    _fail(policy, bad, 1.0, 4)
    assert not policy.is_ejected(bad)
    _fail(policy, bad, 1.0, 1)
    assert policy.is_ejected(bad)
    assert bad not in {policy.pick(SIX, 1.0) for _ in range(30)}
    _ticking(policy, 1.0, 30.5)
    assert policy.is_ejected(bad)  # 30 s base ejection time not over yet
    policy.tick(31.0)
    assert not policy.is_ejected(bad)
    assert bad in {policy.pick(SIX, 31.0) for _ in range(6)}


def test_outlier_second_ejection_lasts_twice_the_base_time() -> None:
    policy = _built("outlier-ejection", SIX)
    bad = SIX[0]
    _fail(policy, bad, 1.0, 5)
    _ticking(policy, 1.0, 31.0)
    assert not policy.is_ejected(bad)
    _fail(policy, bad, 32.0, 5)
    assert policy.is_ejected(bad)
    assert policy.ejection_time(bad) == 60.0
    _ticking(policy, 32.0, 91.5)
    assert policy.is_ejected(bad)
    policy.tick(92.0)
    assert not policy.is_ejected(bad)


def test_outlier_multiplier_decays_while_the_backend_stays_healthy() -> None:
    policy = _built("outlier-ejection", SIX, interval_s=10.0)
    bad = SIX[0]
    _fail(policy, bad, 1.0, 5)
    _ticking(policy, 1.0, 31.0)
    assert policy.describe(bad)["ejection_multiplier"] == 1
    _ticking(policy, 31.5, 60.0)  # two whole intervals un-ejected
    assert policy.describe(bad)["ejection_multiplier"] == 0
    _fail(policy, bad, 60.0, 5)
    assert policy.ejection_time(bad) == 30.0


def test_outlier_max_ejection_percent_is_honoured() -> None:
    policy = _built("outlier-ejection", SIX)  # default 50 %: three of six
    for b in SIX[:4]:
        _fail(policy, b, 1.0, 5)
    assert [policy.is_ejected(b) for b in SIX] == [True, True, True, False, False, False]
    assert policy.pick(SIX[:3], 1.0) is None  # every candidate given is ejected
    envoy = _built("outlier-ejection", SIX, max_ejection_percent=10)
    for b in SIX[:2]:
        _fail(envoy, b, 1.0, 5)
    # Envoy's rule: one host may always be ejected, a second would exceed 10 %
    assert envoy.ejected_count() == 1


def test_outlier_success_rate_ejection_needs_volume_and_hosts() -> None:
    policy = _built("outlier-ejection", SIX, interval_s=10.0)
    for b in SIX:
        for i in range(100):
            outcome = Outcome.ERROR if b == SIX[5] and i % 2 else Outcome.SUCCESS
            _observe(policy, b, 5.0, 0.01, outcome)
            if outcome is Outcome.ERROR:
                _observe(policy, b, 5.0, 0.01)  # never five 5xx in a row
    policy.tick(0.0)
    policy.tick(10.0)
    assert [policy.is_ejected(b) for b in SIX] == [False] * 5 + [True]
    quiet = _built("outlier-ejection", SIX, interval_s=10.0)
    for b in SIX[:4]:  # only four hosts have the request volume: below minimum hosts 5
        for i in range(120):
            _observe(
                quiet, b, 5.0, 0.01, Outcome.ERROR if b == SIX[3] and i % 2 else Outcome.SUCCESS
            )
    quiet.tick(0.0)
    quiet.tick(10.0)
    assert quiet.ejected_count() == 0


# -- trust and oracle ------------------------------------------------------------------


def test_trust_policy_follows_weights_and_skips_ejected_backends() -> None:
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(["a", "b", "c"], 0.0)
    policy = _built("trust", ["a", "b", "c"], trust_engine=engine)
    picks = Counter(policy.pick(["a", "b", "c"], 0.0) for _ in range(300))
    assert picks == {"a": 100, "b": 100, "c": 100}  # equal probation weights
    engine.apply("c", TrustEvent.LOW, 1.0)
    picks = Counter(policy.pick(["a", "b", "c"], 1.0) for _ in range(300))
    assert picks == {"a": 150, "b": 150}
    assert policy.pick(["c"], 1.0) is None
    assert policy.describe("c")["state"] == "ejected"
    assert policy.pick(["unknown"], 1.0) is None  # only backends the engine knows are routed


def test_trust_policy_takes_share_from_a_backend_whose_requests_pile_up() -> None:
    """A backend that stops answering keeps its trust for a window, but its in-flight
    requests pile up, and with them its load: its share falls within a few requests."""
    engine = TrustEngine(HeuristicScorer())
    six = [f"n{i}" for i in range(6)]
    engine.set_backends(six, 0.0)
    policy = _built("trust", six, trust_engine=engine)
    picks: Counter[str] = Counter()
    now = 0.0
    for _ in range(600):  # 3 s at 200 req/s; n5 never answers, the others in 3 ms
        now += 0.005
        b = policy.pick(six, now)
        picks[b] += 1
        policy.on_start(b, now)
        if b != "n5":
            policy.on_end(b, now + 0.003, Outcome.SUCCESS, 0.003)
    assert engine.weight("n5") == engine.weight("n0")  # trust has not moved yet
    assert picks["n5"] <= 25, picks  # round robin would have sent it 100
    plain = _built("trust", six, trust_engine=engine, latency_weighting=False)
    assert Counter(plain.pick(six, now) for _ in range(600)) == {b: 100 for b in six}


def test_trust_policy_turns_from_a_backend_answering_errors_at_once() -> None:
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(["a", "b", "c"], 0.0)
    policy = _built("trust", ["a", "b", "c"], trust_engine=engine)
    for b in "ab":
        _observe(policy, b, 0.1, 0.003)
    _observe(policy, "c", 0.1, 0.003, Outcome.ERROR)  # counts as failure_penalty_s
    picks = Counter(policy.pick(["a", "b", "c"], 0.1) for _ in range(300))
    assert picks["c"] <= 6 and picks["a"] == picks["b"], picks  # <= 2%, round robin 33%
    assert policy.describe("c")["ewma_s"] == pytest.approx(1.0)


def test_trust_policy_ramps_a_backend_back_from_ejection_with_slow_start() -> None:
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(["a", "b", "c"], 0.0)
    for b in "ab":
        engine.apply(b, TrustEvent.HIGH, 0.0)
    engine.apply("c", TrustEvent.LOW, 0.0)
    engine.apply("c", TrustEvent.RETRY_DUE, 10.0)  # back in PROBATION at t=10
    policy = _built("trust", ["a", "b", "c"], trust_engine=engine, latency_weighting=False)
    early = Counter(policy.pick(["a", "b", "c"], 10.5) for _ in range(210))
    assert early["c"] == 10  # weight 0.5 ramped to 10%: 0.05 against 0.5 + 0.5
    later = Counter(policy.pick(["a", "b", "c"], 15.0) for _ in range(300))
    assert later == {"a": 100, "b": 100, "c": 100}  # ramp over after --slow-start 5 s
    off = _built("trust", ["a", "b", "c"], trust_engine=engine, latency_weighting=False,
                 slow_start_s=0.0)  # fmt: skip
    assert Counter(off.pick(["a", "b", "c"], 10.5) for _ in range(300))["c"] == 100


def test_trust_policy_on_a_large_fleet_draws_two_by_weight_and_keeps_the_shares() -> None:
    """Above P2C_ABOVE candidates a pick costs O(log N): two drawn by static weight, the
    less loaded taken. Equal loads: shares follow the weights; a backend that stops
    answering loses its share; an ejected one is never drawn."""
    fleet = [f"n{i}" for i in range(P2C_ABOVE * 4)]
    engine = TrustEngine(HeuristicScorer())
    engine.set_backends(fleet, 0.0)
    for b in fleet[:-2]:
        engine.apply(b, TrustEvent.HIGH, 0.0)  # trusted: weight 0.5 each, "n126" stays 0.5
    engine.apply(fleet[-1], TrustEvent.LOW, 0.0)  # ejected
    policy = _built("trust", fleet, trust_engine=engine, slow_start_s=0.0, seed=5)
    picks = Counter(policy.pick(fleet, 1.0) for _ in range(25_400))
    assert fleet[-1] not in picks
    assert set(picks) == set(fleet[:-1])
    # 127 admitted backends of equal weight: 200 picks each expected, binomial spread
    assert all(140 <= picks[b] <= 260 for b in fleet[:-1]), picks.most_common(3)
    # 3 s at 700 req/s over 42 backends, one never answers (as in the smooth pick's test)
    small = fleet[: P2C_ABOVE + 10]
    engine.set_backends(small, 2.0)
    policy = _built("trust", small, trust_engine=engine, slow_start_s=0.0, seed=5)
    stuck, now, picks = small[0], 2.0, Counter()
    for _ in range(2_100):
        now += 1 / 700
        b = policy.pick(small, now)
        picks[b] += 1
        policy.on_start(b, now)
        if b != stuck:
            policy.on_end(b, now + 0.003, Outcome.SUCCESS, 0.003)
    assert picks[stuck] <= 20, picks[stuck]  # an even share would be 50 (15 with seed 5)


def test_smooth_weighted_pick_shares_traffic_by_float_weights_with_a_floor() -> None:
    weights = {"a": 0.9, "b": 0.3, "c": 0.001}
    current: dict[str, float] = {}
    picks = Counter(
        smooth_weighted_pick(["a", "b", "c", "x"], weights, current, floor=0.01)
        for _ in range(1210)
    )
    assert picks == {"a": 900, "b": 300, "c": 10}  # "x" has no weight: never picked


def test_oracle_routes_only_to_truly_healthy_backends() -> None:
    truth = {"a": NodeClass.HEALTHY, "b": NodeClass.BYZANTINE, "c": NodeClass.HEALTHY}
    policy = _built("oracle", list(truth), truth=truth.__getitem__)
    assert [policy.pick(list(truth), 0.0) for _ in range(4)] == ["a", "c", "a", "c"]
    assert policy.pick(["b"], 0.0) is None
    assert policy.describe("b")["truth"] == "byzantine"
