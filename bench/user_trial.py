"""The user trial: eight real backends behind one `twlb balancer`, driven by the
basic client (`twlb load --mode basic`: cannot verify an answer, never retries).

The backends: a delay node, an error node at 0.5, a byzantine
node at 1.0, a byzantine node lying on 30% of its answers, a lie-latency node and three
benign ones; benign node 5 is switched to byzantine 12 s in. The balancer runs
`--policy trust --audit-fraction 0.1` plus `--balancer-arg`s (e.g. `--model heuristic`);
the load is `twlb load --mode basic --rate 150 --duration 40`. `/trust` is polled every
0.5 s. Prints correct/wrong/failed, the wrong answers each node delivered, and each
faulty node's end state (out of rotation, held by the floor, or in rotation); writes
JSON to --out.

    .venv/bin/python bench/user_trial.py --out docs/results/user-trial.json
    .venv/bin/python bench/user_trial.py --balancer-arg=--model --balancer-arg=heuristic

It uses only the command-line interfaces, so it runs against any build of twlb.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import httpx
from client_support import LoadProcess, start_service

from twlb.options import FiniteFloat

#: (fault flags, its name in the report); benign node 5 turns byzantine at SWITCH_AT_S.
NODES: list[tuple[tuple[str, ...], str]] = [
    (("--fault-type", "delay"), "delay"),
    (("--fault-type", "error", "--fault-probability", "0.5"), "error 0.5"),
    (("--fault-type", "byzantine"), "byzantine 1.0"),
    (("--fault-type", "byzantine", "--fault-probability", "0.3"), "byzantine 0.3"),
    (("--fault-type", "lie-latency"), "lie-latency"),
    ((), "benign, byzantine from 12 s"),
    ((), "benign"),
    ((), "benign"),
]
SWITCHED = 5
SWITCH_AT_S = 12.0


def _row_state(row: dict[str, Any]) -> str:
    health = row.get("health")
    if isinstance(health, dict):
        health = health.get("state")
    if row.get("state") == "ejected" or health == "unhealthy":
        return "out"
    return "held" if row.get("held") else "in"


@click.command()
@click.option("--rate", default=150.0, type=FiniteFloat(min=1.0, max=2000.0))
@click.option("--duration", default=40.0, type=FiniteFloat(min=5.0, max=600.0))
@click.option("--audit-fraction", default=0.1, type=FiniteFloat(0.0, 1.0))
@click.option("--balancer-arg", "balancer_args", multiple=True, help="Extra balancer flag.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    rate: float, duration: float, audit_fraction: float, balancer_args: tuple[str, ...],
    out: Path | None,
) -> None:  # fmt: skip
    token = secrets.token_hex(8)
    procs = []
    with tempfile.TemporaryDirectory(prefix="twlb-trial-") as tmp:
        logs = Path(tmp)
        try:
            urls = []
            for i, (fault, _) in enumerate(NODES):
                proc, url = start_service(
                    "backend", "--node-id", f"trial-{i}", "--seed", str(i),
                    "--control-token", token, "--log-level", "warning", *fault, log_dir=logs,
                )  # fmt: skip
                procs.append(proc)
                urls.append(url)
            proc, balancer = start_service(
                "balancer", "--policy", "trust", "--audit-fraction", repr(audit_fraction),
                "--log-level", "warning", *(a for u in urls for a in ("--backend", u)),
                *balancer_args, log_dir=logs,
            )  # fmt: skip
            procs.append(proc)
            load = LoadProcess(
                ["--url", balancer, "--mode", "basic", "--rate", repr(rate),
                 "--duration", repr(duration)], logs,
            ).start()  # fmt: skip
            t0 = time.monotonic()
            timeline: list[dict[str, Any]] = []
            switched = False
            with httpx.Client(timeout=2.0) as client:
                while load.alive():
                    now = time.monotonic() - t0
                    if not switched and now >= SWITCH_AT_S:
                        client.put(
                            urls[SWITCHED] + "/control/fault",
                            json={"type": "byzantine"},
                            headers={"Authorization": f"Bearer {token}"},
                        ).raise_for_status()
                        switched = True
                    try:
                        trust = client.get(balancer + "/trust").json()
                    except httpx.HTTPError:
                        trust = None
                    if trust is not None:
                        timeline.append(
                            {
                                "t": round(now, 2),
                                "rows": {
                                    r["url"]: {
                                        "state": _row_state(r),
                                        "weight": round(r.get("weight", 0.0), 3),
                                    }
                                    for r in trust["backends"]
                                },
                            }
                        )
                    if now > duration + 60:
                        raise TimeoutError("load overran its duration")
                    time.sleep(0.5)
            run = load.wait(timeout=duration + 60)
            final = httpx.get(balancer + "/trust", timeout=5).json()
        finally:
            for p in reversed(procs):
                p.stop()
    report = run.report
    sent = max(report["sent"], 1)
    nodes = []
    for i, (url, (_, label)) in enumerate(zip(urls, NODES, strict=True)):
        states = [snap["rows"][url]["state"] for snap in timeline if url in snap["rows"]]
        first_out = next(
            (snap["t"] for snap in timeline if snap["rows"].get(url, {}).get("state") == "out"),
            None,
        )
        row = next(r for r in final["backends"] if r["url"] == url)
        nodes.append(
            {
                "node": f"trial-{i}",
                "url": url,
                "fault": label,
                "wrong_delivered": report.get("wrong_by_node", {}).get(f"trial-{i}"),
                "first_out_s": first_out,
                "end_state": states[-1] if states else None,
                "held_polls": states.count("held"),
                "end_weight": row.get("weight"),
                "evidence": row.get("evidence"),
            }
        )
    result = {
        "command": "bench/user_trial.py "
        + " ".join(
            [
                f"--rate {rate:g}",
                f"--duration {duration:g}",
                f"--audit-fraction {audit_fraction:g}",
                *(f"--balancer-arg={a}" for a in balancer_args),
            ]
        ),  # fmt: skip
        "client": "basic (twlb load --mode basic: cannot verify, never retries)",
        "balancer": f"--policy trust --audit-fraction {audit_fraction:g} "
        + " ".join(balancer_args),
        "model": final.get("model", {}).get("version"),
        "sent": report["sent"],
        "correct_pct": round(100.0 * report["correct"] / sent, 3),
        "wrong_pct": round(100.0 * report["wrong"] / sent, 3),
        "failed_pct": round(100.0 * report["failed"] / sent, 3),
        "wrong": report["wrong"],
        "nodes": nodes,
        "timeline": timeline,
    }
    print(
        f"basic client: correct {result['correct_pct']:.2f}%  wrong {result['wrong_pct']:.2f}%  "
        f"failed {result['failed_pct']:.2f}%  ({report['sent']} sent, model {result['model']})"
    )
    for n in nodes:
        print(
            f"  {n['node']} {n['fault']:<28} wrong delivered {n['wrong_delivered'] or 0:>4}  "
            f"out at {n['first_out_s']}s  end: {n['end_state']}  held polls {n['held_polls']}"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
