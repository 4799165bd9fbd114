"""Benchmark: CPU per routing decision against the fleet's size, in one process.

Each policy is driven as the balancer drives it: `pick` over the candidates, then
`on_start` and `on_end` of the chosen backend, with the clock moving 0.1 ms a request.
Round robin is the reference in the same run (ratios: the machines are shared). The trust
policy is measured with every backend trusted and with latency weighting on (its
default); above `P2C_ABOVE` candidates it switches from the smooth pick (O(N)) to two
draws by weight (O(log N)). CPU time of this process, best of `--repeats`. Printed and
written to reports/bench/policy_pick.json.

    .venv/bin/python bench/policy_pick.py
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from client_support import REPORT_DIR, machine, write_json
from rich.console import Console
from rich.table import Table
from twlb.balancer.policies import P2C_ABOVE, make_policy
from twlb.balancer.scoring import HeuristicScorer
from twlb.balancer.trust import TrustEngine, TrustEvent

from twlb.outcome import Outcome

POLICIES = ("round-robin", "p2c-ewma", "trust")


def per_pick_us(policy_name: str, n: int, picks: int, repeats: int) -> float:
    """Best CPU microseconds per pick + on_start + on_end over `repeats` runs."""
    fleet = [f"http://127.0.0.1:{20000 + i}" for i in range(n)]
    kwargs = {}
    if policy_name == "trust":
        engine = TrustEngine(HeuristicScorer())
        engine.set_backends(fleet, 0.0)
        for b in fleet:
            engine.apply(b, TrustEvent.HIGH, 0.0)
        kwargs["trust_engine"] = engine
    policy = make_policy(policy_name, **kwargs)
    policy.set_backends(fleet, 0.0)
    now, best = 1.0, float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(picks):
            now += 0.0001
            b = policy.pick(fleet, now)
            policy.on_start(b, now)
            policy.on_end(b, now + 0.001, Outcome.SUCCESS, 0.001)
        best = min(best, (time.process_time() - start) / picks * 1e6)
    return best


@click.command()
@click.option("--fleet", "fleets", multiple=True, type=click.IntRange(1, 100_000),
              default=(3, 8, P2C_ABOVE, P2C_ABOVE + 1, 100, 1000), show_default=True)  # fmt: skip
@click.option("--picks", default=20_000, type=click.IntRange(100), show_default=True)
@click.option("--repeats", default=3, type=click.IntRange(1, 20), show_default=True)
@click.option("--out", default=REPORT_DIR / "policy_pick.json", type=click.Path(path_type=Path))
def main(fleets: tuple[int, ...], picks: int, repeats: int, out: Path) -> None:
    """CPU per routing decision of round robin, p2c-ewma and trust against fleet size."""
    console = Console()
    rows = []
    for n in fleets:
        # The smooth pick is O(N): fewer picks on large fleets keep the run short.
        count = max(100, min(picks, picks * 100 // n))
        row = {"backends": n, "picks": count}
        for name in POLICIES:
            row[name] = round(per_pick_us(name, n, count, repeats), 3)
        row["trust / round-robin"] = round(row["trust"] / row["round-robin"], 2)
        rows.append(row)
        console.log(f"{n} backends: " + ", ".join(f"{p} {row[p]} us" for p in POLICIES))
    table = Table(title="CPU per pick + on_start + on_end, microseconds (best of repeats)")
    for col in ("backends", *POLICIES, "trust / round-robin"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:,}" for c in ("backends", *POLICIES, "trust / round-robin")))
    console.print(table)
    write_json(out, {"p2c_above": P2C_ABOVE, "rows": rows, "machine": machine()})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
