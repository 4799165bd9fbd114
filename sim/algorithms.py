"""The consensus algorithms the simulator can run, by their `--algorithm` names."""

from __future__ import annotations

from twlb.sim.paxos import MultiPaxos
from twlb.sim.pbft import PBFT
from twlb.sim.raft import Raft

ALGORITHMS: dict[str, type] = {"raft": Raft, "paxos": MultiPaxos, "pbft": PBFT}

__all__ = ["ALGORITHMS"]
