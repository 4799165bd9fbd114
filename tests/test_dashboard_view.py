"""The dashboard's view (sans-IO): rounds of observations in, events and frames out."""

from __future__ import annotations

from twlb.dashboard.view import ClusterView, NodeFacts, Observation

A, B = "http://127.0.0.1:9002", "http://127.0.0.1:9003"


def _row(url: str, weight: float, state: str, held: bool = False, best: str = "healthy") -> dict:
    return {
        "url": url,
        "weight": weight,
        "state": state,
        "held": held,
        "up": True,
        "probabilities": {"healthy": 0.1, best: 0.9} if best != "healthy" else {"healthy": 0.9},
    }


def _obs(
    now: float, rows: list[dict], counters: dict | None = None, nodes=None, **kw
) -> Observation:
    return Observation(
        now=now,
        trust={"policy": "trust", "backends": rows},
        counters=counters or {},
        nodes=nodes or [],
        **kw,
    )


def _ej(url: str, reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("twlb_balancer_ejections_total", (("backend", url), ("reason", reason)))


def test_an_ejection_and_a_readmission_are_events_with_the_counters_reason():
    view = ClusterView()
    assert view.observe(_obs(0.0, [_row(A, 0.9, "trusted")], {_ej(A, "model"): 0.0})) == []
    events = view.observe(
        _obs(1.0, [_row(A, 0.2, "ejected", best="byzantine")], {_ej(A, "model"): 1.0})
    )
    assert [(e["kind"], e["reason"]) for e in events] == [("eject", "model")]
    events = view.observe(_obs(2.0, [_row(A, 0.75, "probation")], {_ej(A, "model"): 1.0}))
    assert [e["kind"] for e in events] == ["readmit"]
    assert [e["kind"] for e in view.snapshot()["events"]] == ["eject", "readmit"]


def test_a_hold_and_its_release_are_events_and_the_card_says_held():
    view = ClusterView()
    view.observe(_obs(0.0, [_row(A, 0.9, "trusted")]))
    assert [e["kind"] for e in view.observe(_obs(1.0, [_row(A, 0.2, "trusted", held=True)]))] == [
        "hold"
    ]
    assert view.frame()["backends"][0]["held"] is True
    assert [e["kind"] for e in view.observe(_obs(2.0, [_row(A, 0.5, "probation")]))] == ["release"]


def test_truth_sits_beside_the_verdict_and_a_dead_process_is_a_crash():
    view = ClusterView()
    node = NodeFacts("n0", A, alive=True, pid=10, restarts=0, fault="byzantine")
    view.observe(_obs(0.0, [_row(A, 0.9, "trusted")], nodes=[node]))
    card = view.frame()["backends"][0]
    assert (card["name"], card["truth"], card["verdict"]) == ("n0", "byzantine", "healthy")
    down = NodeFacts("n0", A, alive=False, pid=10, restarts=0, fault="byzantine")
    events = view.observe(_obs(1.0, [_row(A, 0.9, "trusted")], nodes=[down]))
    assert [e["kind"] for e in events] == ["exit"]
    assert view.frame()["backends"][0]["truth"] == "crash"


def test_a_fault_switch_and_a_replaced_process_are_events():
    view = ClusterView()
    view.observe(_obs(0.0, [], nodes=[NodeFacts("n0", A, True, 10, 0, "benign")]))
    events = view.observe(_obs(1.0, [], nodes=[NodeFacts("n0", A, True, 10, 0, "delay")]))
    assert [(e["kind"], e["node"]) for e in events] == [("fault", "n0")]
    events = view.observe(_obs(2.0, [], nodes=[NodeFacts("n0", A, True, 11, 1, "delay")]))
    assert [e["kind"] for e in events] == ["restart"]
    assert "restart #1" in events[0]["text"]


def test_the_balancer_going_down_and_being_replaced_are_events():
    view = ClusterView()
    view.observe(_obs(0.0, [], balancer_pid=5))
    down = Observation(now=1.0, trust=None, balancer_pid=5)
    assert [e["text"] for e in view.observe(down)] == ["balancer does not answer"]
    assert view.frame()["balancer_up"] is False
    assert [e["kind"] for e in view.observe(_obs(2.0, [], balancer_pid=6))] == ["balancer"]
    assert [e["kind"] for e in view.observe(_obs(3.0, [], balancer_pid=7))] == ["restart"]


def test_states_a_restarted_balancer_starts_over_in_are_not_readmissions():
    view = ClusterView()
    view.observe(
        _obs(0.0, [_row(A, 0.1, "ejected"), _row(B, 0.2, "trusted", held=True)], balancer_pid=5)
    )
    view.observe(Observation(now=1.0, trust=None, balancer_pid=5))
    events = view.observe(
        _obs(2.0, [_row(A, 0.5, "probation"), _row(B, 0.5, "probation")], balancer_pid=6)
    )
    assert [e["kind"] for e in events] == ["balancer", "reset", "reset"]
    # Without a restart, the same change is a readmission.
    view.observe(_obs(3.0, [_row(A, 0.1, "ejected")], balancer_pid=6))
    assert [
        e["kind"] for e in view.observe(_obs(4.0, [_row(A, 0.5, "probation")], balancer_pid=6))
    ] == ["readmit"]


def _up(url: str, outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("twlb_balancer_upstream_requests_total", (("backend", url), ("outcome", outcome)))


def _req(outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("twlb_balancer_requests_total", (("outcome", outcome),))


def test_rates_come_from_counter_increases_and_a_reset_counts_from_zero():
    view = ClusterView()
    view.observe(
        _obs(
            0.0,
            [_row(A, 0.9, "trusted")],
            {_up(A, "success"): 100, _up(A, "error"): 0, _req("success"): 100},
        )
    )
    view.observe(
        _obs(
            2.0,
            [_row(A, 0.9, "trusted")],
            {_up(A, "success"): 130, _up(A, "error"): 10, _req("success"): 130},
        )
    )
    card = view.frame()["backends"][0]
    assert card["req_rate"] == 20.0  # 40 tries in 2 s
    assert card["err_ratio"] == 0.25
    assert view.frame()["outcomes"] == (2.0, {"success": 15.0})
    # The balancer restarted: counters start again from zero, the rate is not negative.
    view.observe(
        _obs(
            4.0,
            [_row(A, 0.9, "trusted")],
            {_up(A, "success"): 8, _up(A, "error"): 0, _req("success"): 8},
        )
    )
    assert view.frame()["backends"][0]["req_rate"] == 4.0
    assert view.frame()["outcomes"] == (4.0, {"success": 4.0})


def test_history_and_the_event_log_stay_bounded():
    view = ClusterView(history_s=10.0, max_events=5)
    for i in range(40):
        state = "ejected" if i % 2 else "trusted"
        view.observe(_obs(float(i), [_row(A, 0.5, state)]))
    snap = view.snapshot()
    assert [t for t, _ in snap["history"][A]] == [float(t) for t in range(29, 40)]
    assert len(snap["events"]) == 5


def test_chaos_records_are_events_in_bounded_words():
    view = ClusterView()
    records = [
        {"action": "kill_node", "node": "n0", "pid": 12, "chaos_class": "crash"},
        {"action": "set_fault", "node": "n1", "fault": {"type": "byzantine"}},
        {"action": "kill_balancer", "balancer": "http://b", "pid": 7, "kill_at": 5.0},
        {"action": "x" * 500, "node": "y" * 500},
    ]
    events = view.observe(_obs(0.0, [], chaos=records))
    assert [e["text"] for e in events[:3]] == [
        "chaos kill_node: n0",
        "chaos set_fault: n1 -> byzantine",
        "chaos kill_balancer: the balancer (pid 7)",
    ]
    assert len(events[3]["text"]) < 300 and len(events[3]["node"]) == 200


def test_a_backend_no_round_names_leaves_once_its_history_aged_out():
    """When a round cannot say who is in the cluster (no membership), a backend missing
    from the balancer's rows is kept until its history ages out."""
    view = ClusterView(history_s=10.0)
    view.observe(_obs(0.0, [_row(A, 0.9, "trusted"), _row(B, 0.9, "trusted")]))
    view.observe(_obs(5.0, [_row(A, 0.9, "trusted")]))
    assert len(view.frame()["backends"]) == 2
    view.observe(_obs(11.0, [_row(A, 0.9, "trusted")]))
    assert [c["url"] for c in view.frame()["backends"]] == [A]


def test_a_removed_replica_leaves_the_page_at_once_and_joins_and_leaves_are_events():
    """The balancer's backends are the cluster (Kubernetes): a backend gone from them is
    gone from the page in the same round, and the change is an event either way."""
    view = ClusterView()
    both = frozenset({A, B})
    rows = [_row(A, 0.9, "trusted"), _row(B, 0.9, "trusted")]
    assert view.observe(_obs(0.0, rows, members=both)) == []
    events = view.observe(_obs(1.0, [rows[0]], members=frozenset({A})))
    assert [(e["kind"], e["node"]) for e in events] == [("remove", "127.0.0.1:9003")]
    assert [c["url"] for c in view.frame()["backends"]] == [A]
    assert B not in view.snapshot()["history"]
    # A late row from the balancer does not bring a removed backend back.
    view.observe(_obs(2.0, rows, members=frozenset({A})))
    assert [c["url"] for c in view.frame()["backends"]] == [A]
    events = view.observe(_obs(3.0, rows, members=both))
    assert [(e["kind"], e["text"]) for e in events] == [
        ("add", "127.0.0.1:9003 joined the cluster")
    ]
    # A round that cannot tell (the balancer did not answer) removes nothing.
    view.observe(Observation(now=4.0, trust=None, members=None))
    assert {c["url"] for c in view.frame()["backends"]} == {A, B}


def test_the_runtimes_scaling_log_gives_the_events_and_its_nodes_the_cards():
    """`twlb up`: the runtime logs add, remove, fail, replace; those are the events (not
    a guess from the membership), and a replaced node's card goes at once."""
    view = ClusterView()
    a, b = NodeFacts("sc-node-0", A, True, 10), NodeFacts("sc-node-1", B, True, 11)
    rows = [_row(A, 0.9, "trusted"), _row(B, 0.9, "trusted")]
    view.observe(_obs(0.0, rows, nodes=[a, b], members=frozenset({A, B}), scaling=[]))
    log = [
        {"seq": 1, "kind": "fail", "node": "sc-node-0", "text": "sc-node-0 failed 3 heartbeats"},
    ]
    events = view.observe(_obs(1.0, [rows[1]], nodes=[b], members=frozenset({B}), scaling=log))
    assert [(e["kind"], e["node"]) for e in events] == [("fail", "sc-node-0")]
    assert [c["name"] for c in view.frame()["backends"]] == ["sc-node-1"]
    c = NodeFacts("sc-node-2", "http://127.0.0.1:9004", True, 12)
    log = [{"seq": 2, "kind": "replace", "node": "sc-node-2", "text": "replaced by sc-node-2"}]
    events = view.observe(
        _obs(2.0, [rows[1]], nodes=[b, c], members=frozenset({B, c.url}), scaling=log)
    )
    assert [e["kind"] for e in events] == ["replace"]
    assert [card["name"] for card in view.frame()["backends"]] == ["sc-node-1", "sc-node-2"]


def test_gossip_views_are_summarised_and_a_404_reads_off():
    view = ClusterView()
    doc = {
        "protocol": "swim",
        "members": [
            {"node": f"n{i}", "state": "alive", "heartbeat": i, "secret": "x"} for i in range(100)
        ]
        + ["junk"],
    }
    view.observe(_obs(0.0, [], gossip={A: doc, B: "off"}))
    gossip = view.frame()["gossip"]
    assert gossip[B] == "off"
    assert gossip[A]["protocol"] == "swim"
    assert len(gossip[A]["members"]) == 64  # bounded whatever a peer sends
    assert set(gossip[A]["members"][0]) == {
        "node", "state", "heartbeat", "incarnation", "generation"
    }  # fmt: skip


def test_a_proven_liar_is_shown_byzantine_whatever_the_model_scores() -> None:
    from twlb.dashboard.view import verdict_of

    scored_healthy = {"probabilities": {"healthy": 0.98, "byzantine": 0.02}}
    assert verdict_of(scored_healthy) == "healthy"
    assert verdict_of({**scored_healthy, "proven": True}) == "byzantine"
