"""twlb.sim: a deterministic discrete-event simulator of distributed protocols.

Consensus (Raft, Multi-Paxos, PBFT), gossip and the replicated hash table are sans-IO
state machines (`twlb.protocol`); the kernel (`twlb.sim.kernel`) drives them over a
simulated network in virtual time from one seeded random source, and every run is
checked (`twlb.sim.checker`).
"""
