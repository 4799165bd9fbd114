"""The simulator's kernel and network: determinism and every fault, on a small ping node."""

from __future__ import annotations

import math

import pytest
from sim_pingnode import Ping, PingNode, Pong, SilentNode
from twlb.sim.kernel import DELIVER, Kernel
from twlb.sim.network import NetworkConfig

from twlb.protocol import ClientRequest, Effects, Operation, OpKind

IDS = ["node_0", "node_1", "node_2"]


def cluster(seed=1, trace=True, **net) -> Kernel:
    kernel = Kernel(seed=seed, network=NetworkConfig(**net), trace=trace)
    for node_id in IDS:
        kernel.spawn(PingNode, node_id, [p for p in IDS if p != node_id], {"period": 0.1})
    return kernel


def in_flight(kernel: Kernel) -> int:
    return sum(1 for event in kernel._queue if event[2] == DELIVER)


def test_same_seed_gives_the_same_trace_event_for_event():
    runs = []
    for _ in range(2):
        kernel = cluster(seed=42, loss=0.1, duplicate=0.05, reorder=0.2)
        kernel.call_at(1.0, kernel.network.fail_node, "node_1")
        kernel.call_at(2.0, kernel.network.recover_node, "node_1")
        kernel.run(until=3.0)
        runs.append((kernel.trace, kernel.events, kernel.stats.as_dict()))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) > 500


def test_another_seed_gives_another_trace():
    a, b = cluster(seed=1, loss=0.1), cluster(seed=2, loss=0.1)
    a.run(until=2.0)
    b.run(until=2.0)
    assert a.trace != b.trace


def test_latency_stays_within_low_and_high():
    kernel = cluster(latency_ms=(20, 30))
    kernel.run(until=2.0)
    sends = {}
    for entry in kernel.trace:
        if entry[1] == "send":
            sends.setdefault((entry[2], entry[3], entry[4]), []).append(entry[0])
    gaps = []
    for at, kind, *rest in kernel.trace:
        if kind == "deliver":
            src, dst, msg = rest
            gaps.append(at - sends[(src, dst, msg)].pop(0))
    assert gaps and min(gaps) >= 0.020 - 1e-9 and max(gaps) <= 0.030 + 1e-9


def test_links_are_fifo_unless_reordering_is_on():
    def out_of_order(kernel):
        last = {}
        count = 0
        for _at, kind, *rest in kernel.trace:
            if kind == "deliver" and isinstance(rest[2], Ping):
                link = (rest[0], rest[1])
                count += rest[2].n < last.get(link, 0)
                last[link] = max(last.get(link, 0), rest[2].n)
        return count

    # period 10 ms against 10..100 ms latency: a link always carries several pings.
    fifo = Kernel(seed=3, network=NetworkConfig(), trace=True)
    shuffled = Kernel(seed=3, network=NetworkConfig(reorder=0.5), trace=True)
    for kernel in (fifo, shuffled):
        for node_id in IDS:
            kernel.spawn(PingNode, node_id, [p for p in IDS if p != node_id], {"period": 0.01})
        kernel.run(until=2.0)
    assert out_of_order(fifo) == 0
    assert out_of_order(shuffled) > 10


def test_packet_loss_drops_about_the_asked_fraction():
    kernel = cluster(trace=False, loss=0.3)
    kernel.run(until=60.0)
    s = kernel.stats
    assert s.sent > 5000
    assert 0.27 < s.dropped_loss / s.sent < 0.33  # binomial: 5 sigma is about 0.03 here
    assert s.delivered + s.dropped + in_flight(kernel) == s.sent


def test_duplication_delivers_a_message_twice():
    kernel = cluster(trace=False, duplicate=0.2)
    kernel.run(until=60.0)
    s = kernel.stats
    assert 0.17 < s.duplicated / s.sent < 0.23
    assert s.delivered + in_flight(kernel) == s.sent + s.duplicated


def test_partition_cuts_both_ways_and_heal_restores():
    kernel = cluster()
    kernel.network.create_partition({"node_0"}, {"node_1", "node_2"})
    kernel.call_at(1.0, kernel.network.heal)
    kernel.run(until=2.0)
    delivered = [(at, rest) for at, kind, *rest in kernel.trace if kind == "deliver"]
    across = [(at, src, dst) for at, (src, dst, _m) in delivered if "node_0" in (src, dst)]
    assert all(at >= 1.0 for at, _s, _d in across)
    assert any(src == "node_0" for _a, src, _d in across)
    assert any(dst == "node_0" for _a, _s, dst in across)
    assert kernel.stats.dropped_partition > 0
    assert [action for _t, action, _d in kernel.network.log] == ["partition", "heal"]


def test_partition_drops_messages_already_in_flight():
    kernel = Kernel(seed=0, network=NetworkConfig(latency_ms=(100, 100)), trace=True)
    a = kernel.spawn(SilentNode, "a", ["b"])
    kernel.spawn(SilentNode, "b", ["a"])
    kernel._apply("a", Effects(send=[("b", Ping(1))]))
    kernel.call_at(0.05, kernel.network.create_partition, {"a"}, {"b"})
    kernel.run(until=1.0)
    assert kernel.stats.dropped_partition == 1 and kernel.stats.delivered == 0
    assert a.pongs == 0


def test_crashed_node_is_rebuilt_from_its_persistent_state_only():
    kernel = cluster()
    kernel.call_at(1.0, kernel.network.fail_node, "node_1")
    kernel.run(until=1.5)
    assert "node_1" not in kernel.nodes
    persisted = kernel.network.down["node_1"]["pongs"]
    assert persisted > 0
    kernel.network.recover_node("node_1")
    reborn = kernel.nodes["node_1"]
    assert reborn.pongs == persisted and reborn.started_at == [1.5]
    assert reborn.timer_times == []  # timers of the dead process died with it
    kernel.run(until=2.5)
    assert reborn.pongs > persisted and reborn.timer_times
    assert kernel.stats.dropped_down > 0  # pings to it while it was down


def test_crash_stop_cannot_recover():
    kernel = cluster()
    kernel.network.fail_node("node_2", crash_stop=True)
    with pytest.raises(ValueError, match="crash-stopped"):
        kernel.network.recover_node("node_2")
    with pytest.raises(ValueError, match="not a running node"):
        kernel.network.fail_node("node_2")


def test_paused_node_handles_nothing_until_it_resumes():
    kernel = cluster()
    kernel.call_at(1.0, kernel.network.pause_node, "node_0", 0.5)
    kernel.run(until=3.0)
    node = kernel.nodes["node_0"]
    handled = node.timer_times + node.message_times
    assert not [t for t in handled if 1.0 < t < 1.5]
    backlog = [t for t in node.message_times if t == 1.5]
    assert len(backlog) >= 2  # its inbox arrives all at once when it resumes
    assert any(t > 1.5 for t in node.timer_times)


def test_clock_skew_shifts_a_nodes_now_and_its_alarms():
    kernel = Kernel(seed=5, network=NetworkConfig(), trace=True)
    kernel.network.set_clock_skew("node_0", offset=100.0, rate=2.0)
    node = kernel.spawn(PingNode, "node_0", ["node_1"], {"period": 1.0})
    kernel.spawn(SilentNode, "node_1", ["node_0"])
    kernel.run(until=10.0)
    assert node.started_at == [100.0]
    timer_globals = [at for at, kind, *rest in kernel.trace if kind == "timer"]
    # On its own clock it wakes every 0.5..1.5 s; that is 0.25..0.75 s of true time.
    assert [100.0 + 2.0 * t for t in timer_globals] == pytest.approx(node.timer_times)
    gaps = [b - a for a, b in zip(timer_globals, timer_globals[1:], strict=False)]
    assert gaps and max(gaps) <= 0.75 + 1e-9 and min(gaps) >= 0.25 - 1e-9


class ExactWaiter:
    """Wakes at exactly t = 0.1, 0.2, ... on its own clock, and asks again for the same
    time while its clock reads earlier (as a slotted schedule does)."""

    def __init__(self, node_id, peers, rng, config):
        self.node_id, self.slot, self.woken = node_id, 0.0, []

    def start(self, now):
        self.slot = round(math.floor(now * 10) / 10 + 0.1, 10)  # its clock's next slot
        return Effects(wake_at=self.slot)

    def on_timer(self, now):
        if now >= self.slot:
            self.woken.append(now)
            self.slot = round(self.slot + 0.1, 10)
        return Effects(wake_at=self.slot)

    def on_message(self, src, message, now):
        return Effects()

    def on_request(self, request, now):
        return Effects()


@pytest.mark.parametrize(
    ("offset", "rate"), [(0.3, 1.0 + 1e-6), (-7.123456789, 0.999), (1e6 / 3, 1.0001), (0.1, 3.0)]
)
def test_a_skewed_clock_never_wakes_a_node_before_its_time_nor_hangs(offset, rate):
    kernel = Kernel(seed=1, network=NetworkConfig())
    kernel.network.set_clock_skew("node_0", offset=offset, rate=rate)
    node = kernel.spawn(ExactWaiter, "node_0", [])
    kernel.run(until=20.0, max_events=100_000)
    assert kernel.pending() and kernel.stats.timers < 100_000  # it got through, no spin
    true_span = 20.0 - 0.0
    assert len(node.woken) == pytest.approx(true_span * rate * 10, abs=2)
    assert all(b > a for a, b in zip(node.woken, node.woken[1:], strict=False))


def test_client_request_reaches_the_node_and_the_reply_comes_back():
    kernel = cluster()
    got = []
    kernel.register_client("c1", lambda reply, node, now: got.append((reply, node, now)))
    request = ClientRequest("c1", 1, Operation(OpKind.GET, "k"))
    kernel.call_at(1.0, kernel.send_request, "c1", "node_2", request)
    kernel.run(until=2.0)
    ((reply, node, now),) = got
    assert reply.seq == 1 and reply.ok and node == "node_2" and 1.02 <= now <= 1.2


def test_request_to_a_down_node_is_lost():
    kernel = cluster()
    got = []
    kernel.register_client("c1", lambda reply, node, now: got.append(reply))
    kernel.network.fail_node("node_2")
    kernel.send_request("c1", "node_2", ClientRequest("c1", 1, Operation(OpKind.GET, "k")))
    kernel.run(until=1.0)
    assert got == []


def test_events_are_recorded_with_time_and_node():
    kernel = cluster()
    kernel.run(until=1.0)
    assert kernel.events
    at, node_id, event = kernel.events[0]
    assert 0 < at <= 1.0 and node_id in IDS and event[0] == "pong"
    assert all(isinstance(e[2], tuple) for e in kernel.events)


def test_max_events_bounds_the_work():
    kernel = cluster(trace=False)
    assert kernel.run(until=1e9, max_events=1000) == 1000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"latency_ms": (50, 10)}, "latency"),
        ({"latency_ms": (-1, 10)}, "latency"),
        ({"loss": 1.5}, "loss"),
        ({"duplicate": -0.1}, "duplicate"),
    ],
)
def test_bad_network_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**kwargs)


def test_bad_faults_are_refused():
    kernel = cluster()
    with pytest.raises(ValueError, match="disjoint"):
        kernel.network.create_partition({"node_0"}, {"node_0", "node_1"})
    with pytest.raises(ValueError, match="not down"):
        kernel.network.recover_node("node_0")
    with pytest.raises(ValueError, match="already exists"):
        kernel.spawn(PingNode, "node_0", [])
    with pytest.raises(ValueError, match="rate"):
        kernel.network.set_clock_skew("node_0", rate=0)


def test_pong_type_is_counted_in_state():
    kernel = cluster()
    kernel.run(until=1.0)
    node = kernel.nodes["node_0"]
    pongs = sum(
        1 for e in kernel.trace if e[1] == "deliver" and e[3] == "node_0" and isinstance(e[4], Pong)
    )
    assert node.pongs == pongs
