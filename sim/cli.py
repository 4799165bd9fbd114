"""`twlb sim`: run a checked simulation, check a recorded history, sweep seeds, sweep the
replicated hash table, compare load-balancing policies on simulated servers."""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
from twlb.balancer.policies import parse_policy_name
from twlb.sim.check_page import describe_operation, write_page
from twlb.sim.checker import (
    DEFAULT_MAX_MEMORY,
    MODELS,
    SearchBudgetExceeded,
    check_history,
    format_bytes,
)
from twlb.sim.history import HistoryError, Workload, read_history
from twlb.sim.lb import LbScenario, ServerFault, compare
from twlb.sim.paxos import PAXOS_BUGS
from twlb.sim.pbft import BYZANTINE_BEHAVIOURS, PBFT_BUGS
from twlb.sim.raft import RAFT_BUGS
from twlb.sim.runner import ALGORITHMS, Fault, SimConfig, Simulation, load_algorithm
from twlb.sim.sweep import (
    NEMESES,
    SweepSettings,
    exit_status,
    failed_checks,
    flatten,
    replay_command,
    run_config,
    shrink,
    summarise,
    sweep,
)

from twlb import tables
from twlb.exits import UsageFailure
from twlb.options import FiniteFloat, OutputPath
from twlb.vocabulary import PolicyName


def parse_faults(text: str | None) -> list[Fault]:
    """`--faults` is a JSON list of [at, action, args] (or @FILE holding one), the form
    `twlb sim sweep` prints in its replay commands."""
    if not text:
        return []
    try:
        raw = Path(text[1:]).read_text() if text.startswith("@") else text
        rows = json.loads(raw)
        faults = [Fault.from_json(row) for row in rows]
    except (OSError, ValueError, TypeError) as err:
        raise click.BadParameter(
            f"not a fault schedule ([[at, action, args], ...]): {err}"
        ) from None
    return faults


#: Every algorithm's deliberately broken variants, for --bug's help.
BUGS_HELP = "; ".join(
    f"{name}: {', '.join(sorted(bugs))}"
    for name, bugs in (("raft", RAFT_BUGS), ("paxos", PAXOS_BUGS), ("pbft", PBFT_BUGS))
)


def parse_byzantine(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for value in values:
        node, _, mode = value.partition("=")
        if not node or not mode:
            raise click.BadParameter(f"expected NODE=BEHAVIOUR, got {value!r}")
        out[node] = mode
    return out


def check_budget(fn: Callable) -> Callable:
    """--max-check-states: the linearizability search's budget per key; a run that
    exhausts it is undecided (exit 3), not a violation."""
    return click.option(
        "--max-check-states",
        type=click.IntRange(min=1),
        default=None,
        help="Configurations the linearizability search may explore per key before the run is undecided (exit 3).",
    )(fn)


@click.group(invoke_without_command=True)
@click.option("--nodes", type=click.IntRange(1, 1000), default=5, help="Cluster size.")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="raft")
@click.option("--duration", type=FiniteFloat(min=0.1), default=60.0, help="Simulated seconds.")
@click.option(
    "--packet-loss", type=FiniteFloat(0, 1), default=0.0, help="Probability a message is lost."
)
@click.option(
    "--latency", type=(float, float), default=(10.0, 100.0), help="LOW HIGH one-way latency in ms."
)
@click.option(
    "--duplicate",
    type=FiniteFloat(0, 1),
    default=0.0,
    help="Probability a message is delivered twice.",
)
@click.option(
    "--reorder",
    type=FiniteFloat(0, 1),
    default=0.0,
    help="Probability a message may overtake others.",
)
@click.option("--clients", type=click.IntRange(0, 1000), default=3)
@click.option("--keys", type=click.IntRange(1, 10_000), default=3, help="Keys the clients share.")
@click.option("--seed", type=int, default=0)
@click.option(
    "--faults",
    "faults_text",
    default=None,
    help="Fault schedule: JSON [[at, action, args], ...] or @FILE.",
)
@click.option(
    "--byzantine",
    multiple=True,
    metavar="NODE=BEHAVIOUR",
    help="PBFT: a Byzantine replica (repeatable); BEHAVIOUR is one of "
    f"{', '.join(BYZANTINE_BEHAVIOURS)}.",
)
@click.option(
    "--bug",
    default=None,
    help="Run a deliberately broken variant of the protocol (to see the checkers catch it): "
    f"{BUGS_HELP}.",
)
@click.option(
    "--progress-within",
    type=FiniteFloat(min=0.1),
    default=10.0,
    help="Seconds after faults heal by which an operation must complete.",
)
@click.option(
    "--output",
    type=OutputPath(),
    default=None,
    help="Write the run's results as JSON.",
)
@click.option(
    "--history",
    "history_path",
    type=OutputPath(),
    default=None,
    help="Write the client history (Jepsen EDN).",
)
@click.option(
    "--visualize", is_flag=True, help="Draw topology, timeline and message-sequence chart (PNG)."
)
@click.option(
    "--figures",
    type=OutputPath(directory=True),
    default=Path("sim-figures"),
    help="Where --visualize writes.",
)
@click.option(
    "--msc-window",
    type=(FiniteFloat(min=0), FiniteFloat(min=0)),
    default=None,
    help="START END seconds the message-sequence chart shows (default 0 3; narrowed to 300 messages).",
)
@check_budget
@click.pass_context
def command(ctx: click.Context, **options) -> None:
    """Simulate consensus protocols under faults, and check every run.

    `twlb sim --nodes 5 --algorithm raft --duration 60` runs one checked simulation;
    `twlb sim check FILE`, `twlb sim sweep` and `twlb sim lb` are the other tools.
    Exit status of a run: 0 every check passed, 1 a check found a violation, 2 bad input,
    3 undecided (the linearizability search ran out of its budget, no violation found).
    """
    if ctx.invoked_subcommand is not None:
        return
    run_once(**options)


def run_once(**o) -> None:
    try:
        config = SimConfig(
            algorithm=o["algorithm"],
            nodes=o["nodes"],
            seed=o["seed"],
            duration=o["duration"],
            latency_ms=tuple(o["latency"]),
            packet_loss=o["packet_loss"],
            duplicate=o["duplicate"],
            reorder=o["reorder"],
            clients=o["clients"],
            workload=Workload(keys=tuple(f"k{i}" for i in range(o["keys"]))),
            faults=parse_faults(o["faults_text"]),
            byzantine=parse_byzantine(o["byzantine"]),
            protocol={"bug": o["bug"]} if o["bug"] else {},
            progress_within=o["progress_within"],
            trace=o["visualize"],
        )
        if o["max_check_states"]:
            config.max_check_states = o["max_check_states"]
        window = o["msc_window"]
        if window is not None and not window[0] < window[1]:
            raise ValueError(f"--msc-window needs START < END, got {window[0]:g} {window[1]:g}")
        sim = Simulation(config)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    report = sim.finish()
    print_report(report)
    if o["output"]:
        o["output"].parent.mkdir(parents=True, exist_ok=True)
        o["output"].write_text(json.dumps(report, indent=2))
        click.echo(f"results: {o['output']}")
    if o["history_path"]:
        sim.history.write_edn(o["history_path"])
        click.echo(f"history: {o['history_path']}")
    if o["visualize"]:
        from twlb.sim.visualize import draw_all

        for path in draw_all(sim, o["figures"], o["msc_window"]):
            click.echo(f"figure: {path}")
    sys.exit({"passed": 0, "violation": 1, "undecided": 3}[report["outcome"]])


def print_report(report: dict) -> None:
    c = report["config"]
    m = report["messages"]
    lat = report["commit_latency_ms"]
    ops = report["operations"]
    click.echo(
        f"{c['algorithm']}: {c['nodes']} nodes, {c['duration']:g} s simulated in "
        f"{report['wall_seconds']:.2f} s (seed {report['seed']})"
    )
    click.echo(
        f"messages: {m['sent']} sent, {m['delivered']} delivered, {m['dropped']} dropped, "
        f"{m['duplicated']} duplicated"
    )
    click.echo(
        f"operations: {ops.get('ok', 0)} ok, {ops.get('fail', 0)} failed, {ops.get('info', 0)} unknown; "
        f"{report['throughput_ops_per_s']:.1f} ops/s; leader/view changes: {report['leader_changes']}"
    )
    if lat["count"]:
        click.echo(
            f"commit latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}"
        )
    for name, check in report["checks"].items():
        extra = check.get("reason") or ""
        if name == "invariants" and check.get("violations"):
            extra = "; ".join(f"{v['invariant']}: {v['detail']}" for v in check["violations"][:5])
        click.echo(f"check {name}: {check['verdict']}{(' (' + extra + ')') if extra else ''}")
    for error in report["fault_errors"]:
        click.echo(f"fault not applied: {error}")


def parse_size(text: str) -> int:
    """A memory size: bytes, or a number with K/M/G/T (powers of 1024; `iB`/`B` optional)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?B)?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 512MiB, 4GiB, 1000000)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size < 1024**2:
        raise ValueError(f"{text!r} is below the smallest budget, 1MiB")
    return size


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@command.command("check")
@click.argument("history_file", type=click.Path(path_type=Path))
@click.option(
    "--model", type=click.Choice(sorted(MODELS)), default="kv", help="Sequential specification."
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option(
    "--max-memory",
    type=Size(),
    default=DEFAULT_MAX_MEMORY,
    show_default="1GiB",
    help="Give up (exit 3) when the searches hold more than this (e.g. 512MiB, 8GiB).",
)
@click.option(
    "--time-limit",
    type=FiniteFloat(min=0.001),
    default=None,
    help="Give up (exit 3) after this many seconds.",
)
@click.option(
    "--max-states",
    type=click.IntRange(min=1),
    default=None,
    help="Give up (exit 3) after exploring this many configurations of one key.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write a self-contained page drawing the history and, when it is not "
    "linearizable, the longest linearizable prefix and the operation that cannot be placed.",
)
def check_command(
    history_file: Path,
    model: str,
    as_json: bool,
    max_memory: int,
    time_limit: float | None,
    max_states: int | None,
    html_path: Path | None,
) -> None:
    """Check a recorded history for linearizability: a Jepsen EDN history, a Porcupine kv
    log or a jepsen-etcd log (see docs/checker.md).

    Exit status: 0 linearizable, 1 not linearizable, 2 the file cannot be read or does
    not fit the model, 3 undecided within the budgets (memory, time, configurations).
    """
    started = time.perf_counter()

    # Progress on stderr once a check has run 2 s: rewritten in place each second on a
    # terminal, a line every PROGRESS_EVERY_S seconds otherwise (logs, pipes).
    terminal = sys.stderr.isatty()
    shown = [0.0]

    def progress(p) -> None:
        if p.seconds < 2 or (not terminal and p.seconds - shown[0] < PROGRESS_EVERY_S):
            return
        shown[0] = p.seconds
        decided = sum(k.status == "linearizable" for k in p.keys)
        states = sum(k.states for k in p.keys)
        line = (
            f"checking {history_file}: {decided} of {len(p.keys)} key(s) decided, "
            f"{states:,} configurations, {format_bytes(p.memory)}, {p.seconds:.0f} s"
        )
        click.echo(f"\r{line}\x1b[K" if terminal else line, err=True, nl=not terminal)

    try:
        history = read_history(history_file)
    except HistoryError as err:
        raise UsageFailure(f"{history_file}: {err}") from None
    try:
        verdict = check_history(
            history,
            model,
            max_states=max_states,
            max_memory=max_memory,
            time_limit=time_limit,
            on_progress=progress,
        )
    except HistoryError as err:
        raise UsageFailure(f"{history_file}: {err}") from None
    except SearchBudgetExceeded as err:
        if terminal and shown[0]:
            click.echo(err=True)
        if html_path is not None:
            write_page(html_path, history, model, None, err.progress, source=str(history_file))
        if as_json:
            out = {"model": model, "linearizable": None, "undecided": err.reason}
            out["progress"] = err.progress.as_dict() if err.progress else None
            out["process_peak_rss_bytes"] = process_peak_rss()
            click.echo(json.dumps(out, indent=2))
        click.echo(f"undecided: {history_file}: {err}", err=True)
        if html_path is not None:
            click.echo(f"page: {html_path}", err=True)
        sys.exit(3)
    if terminal and shown[0]:
        click.echo(err=True)
    if html_path is not None:
        write_page(html_path, history, model, verdict, None, source=str(history_file))
    if as_json:
        out = verdict.as_dict()
        out["peak_memory_bytes"] = verdict.peak_memory
        out["process_peak_rss_bytes"] = process_peak_rss()
        click.echo(json.dumps(out, indent=2))
    else:
        print_verdict(history_file, model, verdict, time.perf_counter() - started)
    if html_path is not None:
        click.echo(f"page: {html_path}", err=as_json)
    sys.exit(0 if verdict.linearizable else 1)


def process_peak_rss() -> int | None:
    """This process's peak resident memory since it started (Linux's VmHWM, which, unlike
    getrusage's maximum, does not carry over what the parent had when it forked us)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: Seconds between progress lines when stderr is not a terminal.
PROGRESS_EVERY_S = 10.0
#: Events of a failing prefix printed; --json has them all.
PREFIX_SHOWN = 12


def print_verdict(history_file: Path, model: str, verdict, wall: float) -> None:
    ops = sum(k.operations for k in verdict.keys)
    states = sum(k.states for k in verdict.keys)
    word = "linearizable" if verdict.linearizable else "NOT linearizable"
    click.echo(
        f"{history_file}: {word} ({model} model, {ops} operations on {len(verdict.keys)} "
        f"key(s), {states:,} configurations explored, peak memory "
        f"{format_bytes(verdict.peak_memory)}, {wall:.3f} s)"
    )
    if verdict.linearizable or verdict.stuck is None:
        return
    key = "" if verdict.failing_key is None else f" of key {verdict.failing_key!r}"
    ops_of_key = verdict.failing_operations
    stuck = ops_of_key[verdict.stuck]
    click.echo(
        f"longest linearizable prefix{key}: {len(verdict.longest)} operations placed; "
        f"no linearization places this operation:"
    )
    click.echo(f"  {describe_operation(stuck)}")
    prefix = verdict.prefix
    if prefix:
        last = prefix[-1].line
        where = f" (ends at line {last})" if last else ""
        click.echo(f"failing prefix{key}: {len(prefix)} events{where}")
        if len(prefix) > PREFIX_SHOWN:
            click.echo(f"  ... {len(prefix) - PREFIX_SHOWN} earlier events (--json lists them)")
        for event in prefix[-PREFIX_SHOWN:]:
            click.echo(f"  {event.to_edn()}")


def seeds_in_parallel(fn: Callable) -> Callable:
    """The options every sweep takes: --workers, --time-limit, --output."""
    for option in (
        click.option(
            "--output",
            type=OutputPath(),
            default=None,
            help="Write every run and the summary as JSON.",
        ),
        click.option(
            "--time-limit",
            type=FiniteFloat(min=1),
            default=None,
            help="Stop starting runs after this many wall seconds.",
        ),
        click.option("--workers", type=click.IntRange(1, 64), default=1, help="Processes."),
    ):
        fn = option(fn)
    return fn


@command.command("sweep")
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="raft")
@click.option("--runs", type=click.IntRange(1, 1_000_000), default=100, help="How many seeds.")
@click.option("--first-seed", type=int, default=0)
@click.option(
    "--nemesis",
    default="partition,loss,crash",
    help=f"Comma-separated, spread over the seeds (seed s takes the (s mod k)-th): {','.join(NEMESES)}.",
)
@click.option(
    "--mix", is_flag=True, help="Draw every episode's nemesis from all named, in every seed."
)
@click.option("--nodes", type=click.IntRange(1, 100), default=5)
@click.option(
    "--duration", type=FiniteFloat(min=2.0), default=30.0, help="Simulated seconds per run."
)
@click.option("--episodes", type=click.IntRange(0, 100), default=4, help="Fault episodes per run.")
@click.option("--latency", type=(float, float), default=(10.0, 100.0), help="LOW HIGH ms.")
@click.option("--packet-loss", type=FiniteFloat(0, 1), default=0.0)
@click.option("--clients", type=click.IntRange(0, 100), default=3)
@click.option("--progress-within", type=FiniteFloat(min=0.1), default=10.0)
@seeds_in_parallel
@click.option(
    "--no-shrink", is_flag=True, help="Report violations without shrinking their schedules."
)
@click.option(
    "--bug", default=None, help=f"Sweep a deliberately broken variant of the protocol: {BUGS_HELP}."
)
@click.option(
    "--byzantine-behaviours",
    default=None,
    metavar="NAME[,NAME]",
    help="With the byzantine nemesis: what the Byzantine replicas do (default: any the algorithm offers).",
)
@check_budget
def sweep_command(**o) -> None:
    """Run many seeds with random fault schedules; shrink and print any violation.

    Exit status: 0 no violation, 1 a violation was found, 2 bad input, 3 no violation
    but a run the linearizability checker could not decide.
    """
    nemeses = tuple(n.strip() for n in o["nemesis"].split(",") if n.strip())
    unknown = sorted(set(nemeses) - set(NEMESES))
    if unknown or not nemeses:
        raise click.BadParameter(
            f"unknown nemesis {', '.join(unknown) or '(none named)'}; choose from {', '.join(NEMESES)}",
            param_hint="--nemesis",
        )
    if o["duration"] <= o["progress_within"] + 2:
        raise click.BadParameter(
            "must exceed --progress-within + 2 s so faults can heal in time",
            param_hint="--duration",
        )
    try:
        behaviours = byzantine_behaviours(o["algorithm"]) if "byzantine" in nemeses else ()
        if o["byzantine_behaviours"]:
            chosen = tuple(b.strip() for b in o["byzantine_behaviours"].split(",") if b.strip())
            unknown_behaviours = sorted(set(chosen) - set(byzantine_behaviours(o["algorithm"])))
            if unknown_behaviours or "byzantine" not in nemeses:
                raise ValueError(
                    "--byzantine-behaviours needs the byzantine nemesis and names from "
                    f"{', '.join(byzantine_behaviours(o['algorithm']))}"
                )
            behaviours = chosen
        settings = SweepSettings(
            algorithm=o["algorithm"],
            nodes=o["nodes"],
            duration=o["duration"],
            progress_within=o["progress_within"],
            packet_loss=o["packet_loss"],
            latency_ms=tuple(o["latency"]),
            clients=o["clients"],
            nemeses=nemeses,
            episodes=o["episodes"],
            protocol={"bug": o["bug"]} if o["bug"] else {},
            byzantine_behaviours=behaviours,
            mix=o["mix"],
            max_check_states=o["max_check_states"],
        )
        load_algorithm(o["algorithm"])
        Simulation(settings.config(o["first_seed"])[0])  # builds the nodes: checks --bug
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    seeds = range(o["first_seed"], o["first_seed"] + o["runs"])
    results, wall = with_progress(
        f"[bold]{o['algorithm']}[/] sweep",
        len(seeds),
        lambda tick: sweep(
            settings, seeds, workers=o["workers"], on_result=tick, time_limit=o["time_limit"]
        ),
    )
    summary = summarise(results, wall)
    print_table(
        f"twlb sim sweep: {o['algorithm']}, {o['nodes']} nodes, nemesis {','.join(nemeses)}",
        {
            "runs": summary["runs"],
            "passed": summary["passed"],
            "violations": summary["violations"],
            "undecided": summary["undecided"],
            "ops ok": summary["operations_ok"],
            "leader changes": summary["leader_changes"],
            "faults": summary["faults_injected"],
            "wall s": f"{summary['wall_seconds']:.1f}",
            "s/run": f"{summary['mean_wall_per_run'] or 0:.3f}",
        },
    )
    if len(summary["by_nemesis"]) > 1:
        for name, row in summary["by_nemesis"].items():
            click.echo(
                f"  {name}: {row['runs']} runs, {row['violations']} violations, "
                f"{row['undecided']} undecided"
            )
    report_limits(summary, o["runs"])
    violations = []
    for seed in summary["failing_seeds"][:5]:
        config, schedule = settings.config(seed)
        if o["no_shrink"]:
            minimal, report = schedule, run_config(config)
        else:
            minimal, report = shrink(config, schedule)
        replay = replace(config, faults=flatten(minimal))
        checks = failed_checks(report)
        click.echo(f"VIOLATION seed {seed}: {', '.join(checks)}")
        click.echo(f"  minimal fault schedule ({len(minimal)} of {len(schedule)} episodes):")
        for fault in replay.faults:
            click.echo(f"    {fault.describe()}")
        click.echo(f"  replay: {replay_command(replay)}")
        violations.append(
            {
                "seed": seed,
                "checks": checks,
                "minimal_faults": [f.as_json() for f in replay.faults],
                "replay": replay_command(replay),
            }
        )
    write_sweep(o, {"summary": summary, "violations": violations, "runs": results})
    sys.exit(exit_status(summary))


def with_progress(label: str, total: int, run: Callable[[Callable[[dict], None]], list]) -> tuple:
    """`run(tick)` under a progress bar on stderr counting runs and violations; the
    results and the wall seconds."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.perf_counter()
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("violations: {task.fields[bad]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("runs", total=total, bad=0)
        bad = [0]

        def tick(result: dict) -> None:
            bad[0] += result["outcome"] == "violation"
            progress.update(task, advance=1, bad=bad[0])

        results = run(tick)
    return results, time.perf_counter() - started


def print_table(title: str, row: dict) -> None:
    from rich.console import Console

    table = tables.table([(column, "right") for column in row], title=title)
    table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def report_limits(summary: dict, asked: int) -> None:
    if summary["undecided"]:
        seeds = ", ".join(str(s) for s in summary["undecided_seeds"][:10])
        click.echo(f"UNDECIDED (checker's search budget ran out, not a violation): seeds {seeds}")
    if summary["runs"] < asked:
        click.echo(f"time limit reached: {summary['runs']} of {asked} runs done")


def write_sweep(o: dict, data: dict) -> None:
    if o["output"]:
        o["output"].parent.mkdir(parents=True, exist_ok=True)
        body = {"settings": {**o, "output": str(o["output"])}, **data}
        o["output"].write_text(json.dumps(body, indent=2, default=str))
        click.echo(f"results: {o['output']}")


@command.command("dht")
@click.option("--runs", type=click.IntRange(1, 1_000_000), default=100, help="How many seeds.")
@click.option("--first-seed", type=int, default=0)
@click.option("--nodes", type=click.IntRange(1, 100), default=6)
@click.option("--replication", type=click.IntRange(1, 100), default=3, help="N: homes per key.")
@click.option(
    "--write-quorum", type=click.IntRange(1, 100), default=None, help="W (majority of N)."
)
@click.option(
    "--read-quorum", type=click.IntRange(1, 100), default=None, help="Rq (majority of N)."
)
@click.option(
    "--mode",
    type=click.Choice(["strict", "sloppy"]),
    default="strict",
    help="strict: quorums of the key's homes, linearizable; sloppy: stand-ins count.",
)
@click.option(
    "--nemesis",
    default="crash,partition,skew",
    help="Comma-separated, spread over the seeds: " + ",".join(sorted(set(NEMESES))) + ".",
)
@click.option("--mix", is_flag=True, help="Draw every episode's nemesis from all named.")
@click.option("--episodes", type=click.IntRange(0, 100), default=4, help="Fault episodes per run.")
@click.option(
    "--duration", type=FiniteFloat(min=3.0), default=20.0, help="Simulated seconds of load."
)
@click.option(
    "--settle",
    type=FiniteFloat(min=0),
    default=10.0,
    help="Seconds after healing for hand-off and anti-entropy.",
)
@click.option("--clients", type=click.IntRange(1, 100), default=4)
@click.option("--keys", type=click.IntRange(1, 1000), default=6)
@click.option("--bug", default=None, help="Sweep a deliberately broken variant of the table.")
@seeds_in_parallel
@check_budget
def dht_command(**o) -> None:
    """Sweep seeds of the replicated hash table under faults; every run checked.

    Each run: clients put, get and delete keys through random nodes while the nemesis
    crashes (at most N-1 nodes down at once), partitions and skews clocks; then the
    cluster heals and repairs, and every key is read. Checks: linearizability (strict
    mode), no acknowledged write lost, no stale read (strict), replicas converged,
    final reads answered. Exit status: 0 no violation, 1 a violation, 2 bad input,
    3 no violation but a run the linearizability checker could not decide.
    """
    from twlb.sim.dht_run import DhtSweepSettings, dht_sweep, summarise_dht

    nemeses = tuple(n.strip() for n in o["nemesis"].split(",") if n.strip())
    try:
        settings = DhtSweepSettings(
            nodes=o["nodes"],
            replication=o["replication"],
            write_quorum=o["write_quorum"],
            read_quorum=o["read_quorum"],
            mode=o["mode"],
            duration=o["duration"],
            settle=o["settle"],
            clients=o["clients"],
            keys=o["keys"],
            nemeses=nemeses,
            episodes=o["episodes"],
            mix=o["mix"],
            bug=o["bug"],
            max_check_states=o["max_check_states"],
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    seeds = range(o["first_seed"], o["first_seed"] + o["runs"])
    results, wall = with_progress(
        f"[bold]dht {o['mode']}[/] sweep",
        len(seeds),
        lambda tick: dht_sweep(
            settings, seeds, workers=o["workers"], on_result=tick, time_limit=o["time_limit"]
        ),
    )
    summary = summarise_dht(results, wall)
    quorums = settings.config(o["first_seed"])[0].table_config()
    print_table(
        f"twlb sim dht: {o['mode']}, {o['nodes']} nodes, N={o['replication']} "
        f"W={quorums.w} Rq={quorums.rq}, nemesis {','.join(nemeses)}"
        + (" (mixed)" if o["mix"] else ""),
        {
            "runs": summary["runs"],
            "violations": summary["violations"],
            "undecided": summary["undecided"],
            "writes acked": summary["writes_acknowledged"],
            "lost": summary["lost_writes"],
            "reads ok": summary["reads_ok"],
            "stale reads": summary["stale_reads"],
            "faults": summary["faults_injected"],
            "wall s": summary["wall_seconds"],
        },
    )
    if o["mode"] == "sloppy" and summary["stale_reads"]:
        click.echo(
            "sloppy quorums promise no lost write, not fresh reads: stale reads counted, not violations"
        )
    for result in [r for r in results if r["outcome"] == "violation"][:5]:
        click.echo(f"VIOLATION seed {result['seed']}: {', '.join(result['failed_checks'])}")
        click.echo(f"  replay: {dht_replay_command(o, result['seed'])}")
    report_limits(summary, o["runs"])
    write_sweep(o, {"summary": summary, "runs": results})
    sys.exit(exit_status(summary))


def dht_replay_command(o: dict, seed: int) -> str:
    parts = ["twlb sim dht", f"--first-seed {seed}", "--runs 1"]
    for name in ("nodes", "replication", "write_quorum", "read_quorum", "mode", "nemesis", "bug"):
        if o[name] is not None:
            parts.append(f"--{name.replace('_', '-')} {o[name]}")
    for name in ("episodes", "duration", "settle", "clients", "keys"):
        parts.append(f"--{name} {o[name]:g}")
    if o["mix"]:
        parts.append("--mix")
    return " ".join(parts)


def byzantine_behaviours(algorithm: str) -> tuple[str, ...]:
    """The Byzantine behaviours the algorithm's module offers (`BYZANTINE_BEHAVIOURS`)."""
    module = importlib.import_module(load_algorithm(algorithm).__module__)
    behaviours = tuple(sorted(getattr(module, "BYZANTINE_BEHAVIOURS", ())))
    if not behaviours:
        raise ValueError(f"algorithm {algorithm!r} has no Byzantine behaviours")
    return behaviours


def parse_server_fault(value: str) -> tuple[int, ServerFault]:
    """SERVER=KIND@START-END[:ERROR_RATE], e.g. 5=error@10-50:0.5 or 3=crash@20-35."""
    try:
        server, rest = value.split("=", 1)
        kind, window = rest.split("@", 1)
        window, _, rate = window.partition(":")
        start, end = window.split("-", 1)
        fault = ServerFault(kind, float(start), float(end), float(rate) if rate else 0.5)
        return int(server), fault
    except ValueError as err:
        raise click.BadParameter(
            f"{value!r}: expected SERVER=KIND@START-END[:RATE] ({err})", param_hint="--fault"
        ) from None


@command.command("lb")
@click.option(
    "--policy",
    "policies",
    default="round-robin,least-connections,p2c-ewma,outlier-ejection,trust,oracle",
    help=f"Comma-separated balancer policies to compare, from: {', '.join(p.value for p in PolicyName)}.",
)
@click.option("--speeds", default="1,1,1,1,0.4,1", help="Relative speed of each simulated server.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="SERVER=KIND@START-END[:RATE]",
    help="A server fault (crash, error, delay); repeatable. Default: 5=error@10-50:0.5 and 3=crash@20-35.",
)
@click.option(
    "--rate",
    type=FiniteFloat(min=0.1, max=100_000),
    default=300.0,
    help="Requests per second.",
)
@click.option(
    "--duration", type=FiniteFloat(min=1, max=3600), default=60.0, help="Simulated seconds."
)
@click.option("--seed", type=int, default=0)
@click.option("--output", type=OutputPath(), default=None, help="Write the comparison as JSON.")
def lb_command(
    policies: str,
    speeds: str,
    faults: tuple[str, ...],
    rate: float,
    duration: float,
    seed: int,
    output: Path | None,
) -> None:
    """Compare the balancer's own routing policies on simulated servers."""
    from rich.console import Console

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        speed_values = tuple(float(s) for s in speeds.split(","))
        for name in names:
            parse_policy_name(name)
        scenario = LbScenario(speeds=speed_values, rate=rate, duration=duration, seed=seed)
        if faults:
            scenario = replace(scenario, faults=dict(parse_server_fault(f) for f in faults))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    results = compare(names, scenario)
    table = tables.table(
        ["policy", *((c, "right") for c in ("success", "p50 ms", "p99 ms", "mean ms",
                                              "tries to unhealthy"))],
        title=f"twlb sim lb: {len(speed_values)} servers, {rate:g} req/s for {duration:g} s "
        f"(seed {seed})",
    )  # fmt: skip
    for r in results:
        lat = r["latency_ms"]
        table.add_row(
            r["policy"],
            f"{r['success_ratio']:.4f}",
            f"{lat['p50']}",
            f"{lat['p99']}",
            f"{r['mean_latency_ms']}",
            f"{r['tries_to_unhealthy_ratio']:.3f}",
        )
    Console().print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        scenario_json = {
            "speeds": list(scenario.speeds),
            "rate": rate,
            "duration": duration,
            "seed": seed,
            "faults": {
                str(i): [f.kind, f.start, f.end, f.error_rate] for i, f in scenario.faults.items()
            },
        }
        output.write_text(json.dumps({"scenario": scenario_json, "results": results}, indent=2))
        click.echo(f"results: {output}")
