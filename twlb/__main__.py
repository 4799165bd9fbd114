"""`python -m twlb` is the `twlb` command."""

from twlb.cli import main

main(prog_name="twlb")
