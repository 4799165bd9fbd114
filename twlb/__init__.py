"""TW-LB: a trust-weighted load balancer and chaos lab for small clusters.

The `twlb` package holds what every part shares: the work contract, the one
`TrustCluster` spec, option declarations, the shared vocabulary, the sans-IO node
contract and the command line. The services (`twlb.backend`, `twlb.balancer`,
`twlb.client`), the operator (`twlb.operator`), the learning code (`twlb.ml`), the
simulator, gossip, the dashboard, the orchestration (`twlb.orchestration`) and local
processes (`twlb.processes`) are mapped into this namespace from their own top-level
folders (docs/DESIGN.md, "Shape").
"""

__version__ = "0.1.0"
