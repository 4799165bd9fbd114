"""Orchestration: what runs the parts together, on top of every other layer.

The embedded runtime (`twlb up`, `twlb status`) and its supervision, scaling
(`twlb replicas`), the collector's live runs (`twlb collect`), the experiments behind
`twlb demo` and `twlb bench`, and the hashing analyses (`twlb hashing`). Nothing below
this package imports it (docs/DESIGN.md, "Layers"; checked by `make lint`).
"""
