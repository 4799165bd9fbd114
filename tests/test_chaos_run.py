"""Timed chaos events: each acts once, in order, when due, and only if it can act."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from twlb.chaos.run import ChaosEvent, ChaosSchedule

from twlb.spec import FaultSpec, FaultType, NodeClass


@dataclass
class _Node:
    name: str
    alive: bool = True


@dataclass
class _Cluster:
    """The part of EmbeddedCluster a schedule drives, recording what was asked of it."""

    nodes: list[_Node]
    refuse_faults: bool = False
    done: list[tuple[str, int, object]] = field(default_factory=list)

    def node(self, index: int) -> _Node:
        return self.nodes[index]

    def kill_node(self, index: int, hold_down_s: float) -> None:
        self.nodes[index].alive = False
        self.done.append(("kill", index, hold_down_s))

    def set_fault(self, index: int, fault: FaultSpec) -> None:
        if self.refuse_faults:
            raise httpx.ConnectError("refused")
        self.done.append(("fault", index, fault.type))


def test_events_act_once_in_time_order_when_due() -> None:
    cluster = _Cluster([_Node("n0"), _Node("n1")])
    byzantine = FaultSpec(type=FaultType.BYZANTINE)
    schedule = ChaosSchedule(
        cluster, [ChaosEvent(5.0, 1, hold_down_s=3.0), ChaosEvent(2.0, 0, byzantine)]
    )
    assert schedule.apply_due(1.9) == []
    assert schedule.apply_due(2.0) == [ChaosEvent(2.0, 0, byzantine)]
    assert schedule.apply_due(4.0) == []
    assert [e.action for e in schedule.apply_due(60.0)] == ["kill"]
    assert schedule.apply_due(120.0) == []
    assert cluster.done == [("fault", 0, FaultType.BYZANTINE), ("kill", 1, 3.0)]


def test_an_event_that_cannot_act_is_not_reported_as_acted() -> None:
    cluster = _Cluster([_Node("n0", alive=False), _Node("n1")], refuse_faults=True)
    lines: list[str] = []
    schedule = ChaosSchedule(
        cluster, [ChaosEvent(1.0, 0), ChaosEvent(1.0, 1, FaultSpec())], log=lines.append
    )
    assert schedule.apply_due(1.0) == []
    assert cluster.done == []
    assert lines == ["  t+1.0s could not switch n1: refused"]


def test_an_events_label_and_class_say_what_it_does() -> None:
    kill = ChaosEvent(1.0, 2)
    switch = ChaosEvent(1.0, 3, FaultSpec(type=FaultType.LIE_LATENCY))
    assert (kill.label, kill.onset_class) == ("kill node-2", NodeClass.CRASH)
    assert (switch.label, switch.onset_class) == ("node-3 -> lie-latency", NodeClass.DELAY)
    assert switch.describe()["fault"]["type"] == "lie-latency"
    assert kill.describe()["action"] == "kill"
