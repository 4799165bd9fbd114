"""twlb.gossip: failure detection and membership by gossip among the backend nodes.

Sans-IO cores (`twlb.gossip.heartbeat` for the four heartbeat protocols of Ranganathan
et al. 2001, `twlb.gossip.swim` for SWIM with Lifeguard) follow the contract of
`twlb.protocol`: fed messages, timer ticks and `now`, they return messages to send
and membership changes. `twlb.gossip.agent` drives one over UDP beside a backend's HTTP
server; the simulator drives many in virtual time; `twlb.gossip.consensus` turns the
members' views into first suspicion, first death verdict and full agreement.
"""
