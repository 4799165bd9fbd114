"""TW-LB steering Envoy: TW-LB as the xDS control plane of an Envoy data plane.

`resources` builds Envoy's configuration (sans-IO), `xds` keeps the ADS protocol's state
per stream (sans-IO), `server` is the control plane (gRPC: ADS and the access logs),
`process` starts Envoy by pid, `cli` is `twlb envoy`. docs/envoy.md describes it.
"""
