"""Chaos on Kubernetes: the actions and probes of the cluster experiments in chaos/*.json.

The package is `twlb.chaos_k8s`; the experiments name `twlb.chaos_k8s.activities`.
"""
