"""Local processes: starting `twlb` subcommands and stopping them by pid, ports, and the
state directory a local cluster (`twlb up`) keeps for the commands that read it (`twlb
status`, `twlb replicas`, the chaos experiments, the dashboard)."""
