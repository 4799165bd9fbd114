"""TW-LB: a trust-weighted load balancer and chaos lab for small clusters.

The `twlb` package holds what every part shares: the work contract, the one
`TrustCluster` spec, the command line and the embedded runtime. The services
(`twlb.backend`, `twlb.balancer`, `twlb.client`), the operator (`twlb.operator`)
and the learning code (`twlb.ml`) are mapped into this namespace from their own
top-level folders.
"""

__version__ = "0.1.0"
