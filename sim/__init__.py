"""twlb.sim: a deterministic discrete-event simulator of distributed protocols.

Consensus (Raft, Multi-Paxos, PBFT), gossip and the replicated hash table are sans-IO
state machines (`twlb.protocol`); the kernel (`twlb.sim.kernel`) drives them over a
simulated network in virtual time from one seeded random source, a nemesis that aims at
leaders and at the instants after their acts (`twlb.sim.nemesis`) breaks them, and
every run is checked (`twlb.sim.checker`, `twlb.sim.invariants`, `twlb.sim.dht_run`).
"""
