"""`python -m twlb.chaos`: the same commands as `twlb chaos`."""

from twlb.chaos.cli import command

if __name__ == "__main__":
    command.main(prog_name="twlb chaos")
