"""The `twlb` command: one click group whose subcommands live with their services.

Subcommands are imported lazily, so `twlb backend` does not pay for onnxruntime or
kopf. Every option is also an environment variable through `auto_envvar_prefix="TWLB"`
(`twlb backend --fault-type` reads `TWLB_BACKEND_FAULT_TYPE`). Every error is one line
and every exit status means the same in every subcommand (twlb/exits.py, docs/manual.md).
"""

from __future__ import annotations

import importlib
import os

import click

from twlb import __version__
from twlb.exits import OneLineGroup
from twlb.logs import FORMAT_VARIABLE, LOG_FORMATS

#: subcommand name -> "module:attribute" of a click command.
SUBCOMMANDS: dict[str, str] = {
    "backend": "twlb.backend.cli:command",
    "balancer": "twlb.balancer.cli:command",
    "envoy": "twlb.envoy.cli:command",
    "load": "twlb.client.cli:command",
    "up": "twlb.orchestration.runtime:up_command",
    "status": "twlb.orchestration.runtime:status_command",
    "rollout": "twlb.orchestration.runtime:rollout_command",
    "replicas": "twlb.orchestration.scaling:command",
    "hashing": "twlb.orchestration.hashing_analysis:command",
    "demo": "twlb.orchestration.demo:command",
    "bench": "twlb.orchestration.bench:command",
    "collect": "twlb.orchestration.collect:collect_command",
    "train": "twlb.ml.cli:train_command",
    "operator": "twlb.operator.cli:command",
    "crd": "twlb.operator.cli:crd_command",
    "chaos": "twlb.chaos.cli:command",
    "dashboard": "twlb.dashboard.cli:command",
    "sim": "twlb.sim.cli:command",
    "gossip": "twlb.sim.gossip_cli:command",
}


class LazyGroup(OneLineGroup):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        module_name, attr = SUBCOMMANDS[cmd_name].split(":")
        cmd = getattr(importlib.import_module(module_name), attr)
        if isinstance(cmd, click.Command):
            cmd.name = cmd_name
        return cmd


@click.group(
    "twlb", cls=LazyGroup, context_settings={"auto_envvar_prefix": "TWLB", "show_default": True}
)
@click.version_option(__version__, prog_name="twlb")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=None,
    help="Log lines as text or one JSON object each, for this command and every process it "
    "starts (TWLB_LOG_FORMAT; a process's own --log-format wins).  [default: text]",
)
def main(log_format: str | None) -> None:
    """TW-LB: a trust-weighted load balancer and chaos lab."""
    if log_format is not None:
        # Inherited by the processes this one starts (`twlb up`'s nodes and balancers).
        os.environ[FORMAT_VARIABLE] = log_format


if __name__ == "__main__":
    main()
