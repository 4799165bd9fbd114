"""Benchmark: user-space instructions per proxied request, counted by callgrind.

Throughput on a shared two-core machine moves by a factor of two between runs (nginx's
own did in bench/proxy_bench.py), so a change of a few percent in the proxy's cost is
lost in it. Instruction counts are not: valgrind's callgrind counts the instructions a
process executes in user space, the same for the same code and input whatever else the
machine is doing. This runs three benign `twlb backend` nodes and, one at a time, each
balancer under callgrind with instrumentation off: wrk (32 connections) warms it, then
instrumentation goes on for three windows of `--window` seconds: one of wrk load to
settle (it catches the last of the start-up's lazy work), one idle, one of wrk load. The
figure is the loaded window's instructions less the idle window's (scaled to the same
length), over the requests wrk got answered in the loaded window.

What it counts: the balancer's whole user-space path for each request (HTTP parsing,
the event loop, the policy, the upstream pool, metrics, audits), not the kernel's socket
work (for that, CPU per request in bench/proxy_bench.py), and not the periodic work
(health checks, ticks): under valgrind the process serves about 50 times fewer requests
a second, so that work would weigh 50 times more per request than at full speed; it is
what the idle window measures, and is reported as instructions per second.

`--reference-python` names the interpreter of another build (a venv where an older
checkout is installed, as in bench/proxy_bench.py): its balancers are measured the same
way in the same run, and the figures add this build over the reference.

    .venv/bin/python bench/proxy_instructions.py
    .venv/bin/python bench/proxy_instructions.py --reference-python /tmp/ref-venv/bin/python

Needs valgrind (Debian: apt-get install -y valgrind) and wrk. Printed and written to
reports/bench/proxy_instructions.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from backend_throughput import run_wrk
from client_support import machine
from proxy_bench import WORK_PATH, reference_argv
from rich.console import Console
from rich.table import Table
from twlb.processes.managed import ManagedProcess, free_port, twlb_argv

#: The balancers measured: (policy, audit fraction).
CASES = (("round-robin", 0.0), ("trust", 0.05))


@dataclass
class Count:
    """One balancer's measured window."""

    build: str
    policy: str
    audit_fraction: float
    requests: int
    loaded_instructions: int
    loaded_s: float
    idle_instructions: int
    idle_s: float
    instructions_per_request: float
    idle_instructions_per_s: float


def callgrind_total(path: Path) -> int:
    """The instruction total of one callgrind dump (its `totals:` or `summary:` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split(":", 1)[1].split()[0])
    raise RuntimeError(f"no instruction total in {path}")


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


def measure(
    build: str,
    python: str | None,
    policy: str,
    audits: float,
    backends: list[str],
    root: Path,
    warmup_s: int,
    window_s: int,
) -> Count:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tag = f"{build}-{policy}-{audits}".replace(" ", "_")
    out = root / f"callgrind-{tag}.out"
    args = (
        "balancer", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
        "--audit-fraction", str(audits), "--log-level", "warning",
        *(arg for b in backends for arg in ("--backend", b)),
    )  # fmt: skip
    # This build writes an access log line a request by default; nginx here writes none.
    argv = (
        twlb_argv(*args, "--access-log-sample", "0")
        if python is None
        else reference_argv(python, *args)
    )
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
    ]  # fmt: skip
    proc = ManagedProcess([*valgrind, *argv], log_path=root / f"{tag}.log")
    try:
        proc.start()
        proc.wait_ready(url + "/healthz", timeout=300)
        run_wrk(tag, 0, url + WORK_PATH, warmup_s, 32, 1)
        pid = str(proc.pid)
        control("-i", "on", pid)
        run_wrk(tag, 1, url + WORK_PATH, window_s, 32, 1)
        control("-d", pid)  # the settling window: dump and forget
        began = time.monotonic()
        time.sleep(window_s)
        control("-d", pid)
        idle_s = time.monotonic() - began
        began = time.monotonic()
        run = run_wrk(tag, 2, url + WORK_PATH, window_s, 32, 1)
        control("-d", pid)
        loaded_s = time.monotonic() - began
    finally:
        proc.stop(timeout=30)
    dumps = sorted(root.glob(f"callgrind-{tag}.out.*"), key=lambda p: int(p.suffix[1:]))
    if len(dumps) < 3:
        raise RuntimeError(f"callgrind wrote {len(dumps)} dumps for {tag}, expected 3")
    idle, loaded = callgrind_total(dumps[1]), callgrind_total(dumps[2])
    per_request = (loaded - idle * loaded_s / idle_s) / max(run.requests, 1)
    return Count(
        build, policy, audits, run.requests, loaded, round(loaded_s, 2), idle, round(idle_s, 2),
        per_request, idle / idle_s,
    )  # fmt: skip


@click.command()
@click.option("--reference-python", default=None, help="Interpreter of another build to measure beside this one.")  # fmt: skip
@click.option("--reference-name", default="reference", show_default=True, help="What the reference build is (a commit, say), for the table and the JSON.")  # fmt: skip
@click.option("--warmup", default=5, type=click.IntRange(1, 120), show_default=True, help="Seconds of wrk load before counting.")  # fmt: skip
@click.option("--window", default=10, type=click.IntRange(1, 120), show_default=True, help="Seconds of wrk load per window.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench/proxy_instructions.json"), show_default=True)  # fmt: skip
def main(
    reference_python: str | None, reference_name: str, warmup: int, window: int, out: Path
) -> None:
    for tool, package in (("valgrind", "valgrind"), ("callgrind_control", "valgrind"), ("wrk", "wrk")):  # fmt: skip
        if shutil.which(tool) is None:
            raise click.UsageError(
                f"{tool} is not installed (Debian: apt-get install -y {package})"
            )
    if reference_python is not None and shutil.which(reference_python) is None:
        raise click.BadParameter(f"{reference_python} is not an interpreter", param_hint="--reference-python")  # fmt: skip
    console = Console()
    builds: list[tuple[str, str | None]] = [("this build", None)]
    if reference_python is not None:
        builds.append((reference_name, reference_python))
    counts: list[Count] = []
    with tempfile.TemporaryDirectory(prefix="twlb-proxy-instr-") as tmp:
        root = Path(tmp)
        backends = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
        nodes = [
            ManagedProcess(
                twlb_argv(
                    "backend", "--host", "127.0.0.1", "--port", b.rsplit(":", 1)[1],
                    "--node-id", f"bench-{i}", "--seed", str(i), "--log-level", "warning",
                ),
                log_path=root / f"backend-{i}.log",
            )
            for i, b in enumerate(backends)
        ]  # fmt: skip
        try:
            for node in nodes:
                node.start()
            for node, b in zip(nodes, backends, strict=True):
                node.wait_ready(b + "/healthz", timeout=60)
            steps = [(b, p, c) for p, c in CASES for b in builds]
            for i, ((build, python), policy, audits) in enumerate(steps, 1):
                console.print(f"[{i}/{len(steps)}] {build}: {policy}, audits {audits} under callgrind")  # fmt: skip
                counts.append(
                    measure(build, python, policy, audits, backends, root, warmup, window)
                )
        finally:
            for node in nodes:
                node.stop()
    table = Table(title="user-space instructions per proxied request (callgrind; client: wrk, 32 connections)")  # fmt: skip
    for col in ("build", "policy", "audit fraction", "requests", "instructions / request", "idle instructions / s"):  # fmt: skip
        table.add_column(col, justify="right")
    for c in counts:
        table.add_row(c.build, c.policy, f"{c.audit_fraction:g}", f"{c.requests:,}", f"{c.instructions_per_request:,.0f}", f"{c.idle_instructions_per_s:,.0f}")  # fmt: skip
    console.print(table)
    ratios = {}
    if reference_python is not None:
        for policy, audits in CASES:
            own, ref = (
                next(c for c in counts if c.build == b and c.policy == policy)
                for b in ("this build", reference_name)
            )
            ratio = own.instructions_per_request / ref.instructions_per_request
            ratios[f"{policy} {audits:g}"] = ratio
            console.print(f"{policy}, audits {audits:g}: this build / reference = {ratio:.3f}")
    report = {
        "counts": [asdict(c) for c in counts],
        "this_over_reference": ratios,
        "reference_python": reference_python,
        "reference_name": reference_name if reference_python is not None else None,
        "warmup_s": warmup,
        "window_s": window,
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
