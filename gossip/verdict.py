"""The members' verdict on each backend, as the balancer reads it (sans-IO).

The balancer polls every backend's `GET /gossip`; each answer names the backend's own
member id (`self`) and its view of every member. A backend is `dead` when every view
that answered (its own excluded) marks it dead or left, the consensus of
`twlb.gossip.consensus`; `suspect` when some view suspects or condemns it; `alive` when
every view has it alive; `unknown` before its id is known or while nobody answers. The
balancer takes a dead backend out of rotation at once and lets it back when the members
readmit it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twlb.gossip.consensus import agreed_down
from twlb.gossip.membership import MemberState

#: members read from one answer, whatever a backend sends: a live view holds at most 512
#: living members and as many tombstones of members it forgot (listed as dead or left)
MAX_MEMBERS = 1024


@dataclass
class GossipVerdicts:
    ids: dict[str, str] = field(default_factory=dict)  # backend url -> its member id
    views: dict[str, dict[str, MemberState]] = field(default_factory=dict)  # by url
    protocol: str | None = None

    def set_backends(self, backends: Iterable[str]) -> None:
        keep = set(backends)
        self.ids = {b: i for b, i in self.ids.items() if b in keep}
        self.views = {b: v for b, v in self.views.items() if b in keep}

    def on_answer(self, backend: str, answer: Mapping[str, Any] | None) -> None:
        """One poll of `backend`'s /gossip: its JSON, or None when it did not answer (a
        dead backend's last view must not count)."""
        if answer is None:
            self.views.pop(backend, None)
            return
        me = answer.get("self")
        members = answer.get("members")
        if not isinstance(me, str) or not isinstance(members, list):
            self.views.pop(backend, None)
            return
        self.ids[backend] = me
        if isinstance(answer.get("protocol"), str):
            self.protocol = answer["protocol"]
        view: dict[str, MemberState] = {}
        for m in members[:MAX_MEMBERS]:
            if isinstance(m, dict) and isinstance(m.get("node"), str):
                try:
                    view[m["node"]] = MemberState(m.get("state"))
                except ValueError:
                    continue
        self.views[backend] = view

    def verdict(self, backend: str) -> dict[str, Any]:
        me = self.ids.get(backend)
        others = {self.ids[b]: v for b, v in self.views.items() if b != backend and b in self.ids}
        if me is None or not others:
            return {"verdict": "unknown", "member": me, "views": len(others)}
        states = [v.get(me, MemberState.ALIVE) for v in others.values()]
        if agreed_down(others, me):
            verdict = "dead"
        elif any(s is not MemberState.ALIVE for s in states):
            verdict = "suspect"
        else:
            verdict = "alive"
        down = sum(1 for s in states if s in (MemberState.DEAD, MemberState.LEFT))
        return {"verdict": verdict, "member": me, "views": len(others), "down_in": down}

    def dead(self, backend: str) -> bool:
        return self.verdict(backend)["verdict"] == "dead"
