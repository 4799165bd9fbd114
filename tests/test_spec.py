"""The one TrustCluster spec: validation, error messages and seeded fault assignment."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twlb.spec import (
    FaultType,
    NodeClass,
    SpecError,
    TrustClusterSpec,
    assign_faults,
    load_trustcluster,
    parse_trustcluster,
)
from twlb.work import digest, key_problem


def _doc(**spec):
    return {
        "apiVersion": "twlb.dev/v1alpha1",
        "kind": "TrustCluster",
        "metadata": {"name": "t"},
        "spec": spec,
    }


def test_digest_matches_the_contract_by_hand():
    d1 = hashlib.sha256(b"abc").digest()
    d2 = hashlib.sha256(d1).digest()
    assert digest("abc") == d1.hex()
    assert digest("abc", 2) == d2.hex()
    with pytest.raises(ValueError):
        digest("abc", 0)


def test_key_problem_names_length_and_printability():
    assert key_problem("k") is None
    assert "1..256" in key_problem("")
    assert "1..256" in key_problem("x" * 257)
    assert "printable" in key_problem("a\nb")


def test_same_seed_gives_same_faults_and_different_seed_may_differ():
    spec = {"backends": 6, "seed": 7, "faultMix": [{"type": "delay"}, {"type": "byzantine"}]}
    a = assign_faults(parse_trustcluster(_doc(**spec)).spec)
    b = assign_faults(parse_trustcluster(_doc(**spec)).spec)
    assert a == b
    layouts = {
        tuple(
            n.fault.type
            for n in assign_faults(TrustClusterSpec.model_validate({**spec, "seed": s}))
        )
        for s in range(20)
    }
    assert len(layouts) > 1


@given(
    backends=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    counts=st.lists(st.integers(0, 3), min_size=0, max_size=4),
)
def test_fault_mix_counts_are_honoured(backends, seed, counts):
    types = [FaultType.DELAY, FaultType.ERROR, FaultType.BYZANTINE, FaultType.CRASH]
    if sum(counts) > backends:
        return
    spec = TrustClusterSpec(
        backends=backends,
        seed=seed,
        fault_mix=[{"type": t, "count": c} for t, c in zip(types, counts, strict=False)],
    )
    nodes = assign_faults(spec)
    assert len(nodes) == backends
    for t, c in zip(types, counts, strict=False):
        assert sum(n.fault.type == t for n in nodes) == c
    assert len({n.seed for n in nodes}) == backends


def test_pinned_node_wins_over_the_mix():
    spec = TrustClusterSpec.model_validate(
        {
            "backends": 3,
            "faultMix": [{"type": "error", "count": 3}],
            "nodes": [{"index": 1, "fault": {"type": "byzantine"}}],
        }
    )
    nodes = assign_faults(spec)
    assert nodes[1].fault.type is FaultType.BYZANTINE
    assert nodes[1].fault.node_class is NodeClass.BYZANTINE


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"backends": 0}, "spec.backends"),
        ({"faultMix": [{"type": "melt"}]}, "spec.faultMix.0.type"),
        ({"faultMix": [{"type": "error", "probability": 1.5}]}, "spec.faultMix.0.probability"),
        ({"policy": "fastest"}, "spec.policy"),
        ({"backends": 2, "faultMix": [{"type": "error", "count": 3}]}, "faultMix assigns 3"),
        ({"nodes": [{"index": 5}]}, "index 5 is out of range"),
    ],
)
def test_invalid_spec_names_the_field(spec, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_trustcluster(_doc(**spec))


def test_load_reports_file_and_problem(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(
        "apiVersion: twlb.dev/v1alpha1\nkind: TrustCluster\nmetadata: {name: x}\nspec: {backends: -1}\n"
    )
    with pytest.raises(SpecError, match=r"bad\.yaml: spec\.backends"):
        load_trustcluster(p)
    p.write_text(": : :")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_trustcluster(p)
    with pytest.raises(SpecError, match="cannot read"):
        load_trustcluster(tmp_path / "missing.yaml")
    p.write_bytes(b"kind: TrustCluster\nmetadata: {name: \xff\xfe}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not UTF-8 text \(byte 36: invalid start byte"):
        load_trustcluster(p)


def test_fault_env_round_trips_to_backend_flag_names():
    env = TrustClusterSpec().fault_mix  # empty
    assert env == []
    from twlb.spec import FaultSpec

    f = FaultSpec(type="delay", probability=0.5, delay_ms=300)
    e = f.to_env()
    assert e["TWLB_BACKEND_FAULT_TYPE"] == "delay"
    assert e["TWLB_BACKEND_DELAY_MS"] == "300"
    assert f.to_args()[:4] == ["--fault-type", "delay", "--fault-probability", "0.5"]


def test_retry_budget_allows_ratio_of_traffic_plus_floor_and_expires():
    from twlb.budget import RetryBudget

    b = RetryBudget(ratio=0.1, min_per_s=0.0, ttl_s=10.0)
    for i in range(100):
        b.record_request(i * 0.01)
    granted = sum(b.try_withdraw(1.0) for _ in range(50))
    assert granted == 10
    assert b.refused_total == 40
    # After the window passes, old deposits and withdrawals expire.
    assert b.balance(20.0) == 0.0
    floor = RetryBudget(ratio=0.0, min_per_s=1.0, ttl_s=5.0)
    assert sum(floor.try_withdraw(0.0) for _ in range(10)) == 5


def test_retry_budget_memory_is_bounded_by_its_slots_whatever_the_rate():
    from twlb.budget import SLOTS, RetryBudget

    b = RetryBudget(ratio=0.2, min_per_s=0.0, ttl_s=10.0)
    for i in range(200_000):  # 20,000 requests a second for 10 s, never a retry asked
        b.record_request(i * 0.00005)
    assert len(b._requests._slots) <= SLOTS + 1
    assert b._requests.total == 200_000
    b.record_request(15.0)  # the first half of the window has expired
    assert 100_000 <= b._requests.total <= 100_000 + 200_000 // SLOTS + 1
    assert b.balance(30.0) == 0.0
