"""What a load run saw: a tally filled while it runs, and the report made from it.

`LoadTally` is the raw record (counts by status and every latency), small enough to
pickle from worker processes and merge. `build_report` turns tallies into the JSON
report docs/DESIGN.md promises (`sent`, `correct`, `wrong`, `failed`, `achieved_rate`,
`latency_ms` with p50/p95/p99/max, ...); `render_report` prints it as a rich table.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from twlb.client.client import CallStatus

from twlb.tables import table

REPORT_VERSION = 1
#: Failure reasons always present in `failed_by_reason`, so reports compare key by key.
FAILURE_REASONS = tuple(s.value for s in CallStatus if s not in (CallStatus.OK, CallStatus.WRONG))
MAX_LISTED_TRANSITIONS = 1000


@dataclass
class LoadTally:
    """Everything one run (or one worker of it) counted. Times are seconds from the start."""

    sent: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    #: wrong answers by the node the body names (a client that verifies can tell who lied)
    wrong_by_node: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    hedges: int = 0
    budget_refusals: int = 0
    transitions: list[dict[str, Any]] = field(default_factory=list)
    latency_correct_ms: array = field(default_factory=lambda: array("d"))
    latency_all_ms: array = field(default_factory=lambda: array("d"))
    first_send_s: float | None = None
    last_send_s: float | None = None
    max_send_lag_s: float = 0.0
    elapsed_s: float = 0.0
    contacted: bool = False  # some try got past connecting to the target
    partial: bool = False
    unreachable: bool = False
    stop_reason: str = "completed"

    def record_send(self, at_s: float, lag_s: float) -> None:
        self.sent += 1
        if self.first_send_s is None:
            self.first_send_s = at_s
        self.last_send_s = at_s
        if lag_s > self.max_send_lag_s:
            self.max_send_lag_s = lag_s

    def record_result(self, status: CallStatus, latency_ms: float) -> None:
        self.by_status[status.value] += 1
        self.latency_all_ms.append(latency_ms)
        if status is CallStatus.OK:
            self.latency_correct_ms.append(latency_ms)

    @property
    def answered(self) -> int:
        return sum(self.by_status.values())

    @property
    def correct(self) -> int:
        return self.by_status[CallStatus.OK.value]

    @property
    def wrong(self) -> int:
        return self.by_status[CallStatus.WRONG.value]

    @property
    def failed(self) -> int:
        return self.answered - self.correct - self.wrong

    def merge(self, other: LoadTally) -> None:
        """Fold another worker's tally into this one (same run, same clock origin)."""
        self.sent += other.sent
        self.by_status.update(other.by_status)
        self.wrong_by_node.update(other.wrong_by_node)
        self.retries += other.retries
        self.hedges += other.hedges
        self.budget_refusals += other.budget_refusals
        self.transitions = sorted(self.transitions + other.transitions, key=lambda t: t["at_s"])
        self.latency_correct_ms.extend(other.latency_correct_ms)
        self.latency_all_ms.extend(other.latency_all_ms)
        firsts = [t for t in (self.first_send_s, other.first_send_s) if t is not None]
        lasts = [t for t in (self.last_send_s, other.last_send_s) if t is not None]
        self.first_send_s = min(firsts) if firsts else None
        self.last_send_s = max(lasts) if lasts else None
        self.max_send_lag_s = max(self.max_send_lag_s, other.max_send_lag_s)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.contacted = self.contacted or other.contacted
        self.partial = self.partial or other.partial
        # Unreachable only if no worker ever reached the target.
        self.unreachable = self.sent > 0 and not self.contacted
        if other.stop_reason != "completed" and self.stop_reason == "completed":
            self.stop_reason = other.stop_reason


def latency_summary(samples_ms: array) -> dict[str, float | None]:
    """p50/p95/p99/max/mean in milliseconds (None for no samples), linear interpolation."""
    n = len(samples_ms)
    if n == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "count": 0}
    if n == 1:
        p50 = p95 = p99 = samples_ms[0]
    else:
        cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
        p50, p95, p99 = cuts[49], cuts[94], cuts[98]
    return {
        "p50": round(p50, 3),
        "p95": round(p95, 3),
        "p99": round(p99, 3),
        "max": round(max(samples_ms), 3),
        "mean": round(math.fsum(samples_ms) / n, 3),
        "count": n,
    }


def achieved_rate(tally: LoadTally, target_rate: float) -> float:
    """Sends per second from the scheduled start to the last actual send (plus one interval).

    A generator that keeps up sends its n-th request at (n-1)/rate and scores exactly the
    target; one that falls behind sends its last request late and scores below it. A
    late start that catches up is not rewarded (that burst shows in `max_send_lag_ms`).
    """
    if tally.sent == 0 or tally.last_send_s is None or target_rate <= 0:
        return 0.0
    return tally.sent / (tally.last_send_s + 1.0 / target_rate)


def build_report(tally: LoadTally, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: settings echoed, counts, rates and latencies (all from the tally)."""
    failed_by_reason = {reason: tally.by_status[reason] for reason in FAILURE_REASONS}
    send_span = (
        tally.last_send_s - tally.first_send_s
        if tally.first_send_s is not None and tally.last_send_s is not None
        else 0.0
    )
    return {
        "version": REPORT_VERSION,
        **settings,
        "partial": tally.partial,
        "unreachable": tally.unreachable,
        "stop_reason": tally.stop_reason,
        "sent": tally.sent,
        "correct": tally.correct,
        "wrong": tally.wrong,
        "failed": tally.failed,
        "failed_by_reason": failed_by_reason,
        "wrong_by_node": dict(sorted(tally.wrong_by_node.items())),
        "success_rate": round(tally.correct / tally.sent, 6) if tally.sent else 0.0,
        "retries": tally.retries,
        "hedges": tally.hedges,
        "budget_refusals": tally.budget_refusals,
        "breaker_transitions": len(tally.transitions),
        "breaker_transition_log": tally.transitions[:MAX_LISTED_TRANSITIONS],
        "target_rate": settings.get("rate"),
        "achieved_rate": round(achieved_rate(tally, float(settings["rate"])), 3),
        "throughput": round(tally.correct / tally.elapsed_s, 3) if tally.elapsed_s else 0.0,
        "duration_s": round(tally.elapsed_s, 3),
        "send_span_s": round(send_span, 3),
        "max_send_lag_ms": round(tally.max_send_lag_s * 1000.0, 3),
        "latency_ms": latency_summary(tally.latency_correct_ms),
        "latency_all_ms": latency_summary(tally.latency_all_ms),
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_report(report: dict[str, Any], console: Console) -> None:
    """The human view of a report: outcomes, rates and latencies."""
    title = f"twlb load · {report['mode']} · {report['url']}"
    if report["partial"]:
        title += " · PARTIAL"
    outcomes = table(["outcome", ("count", "right"), ("share", "right")], title=title)
    sent = report["sent"] or 1
    rows = [("sent", report["sent"]), ("correct", report["correct"]), ("wrong", report["wrong"])]
    rows.append(("failed", report["failed"]))
    rows += [(f"  {k}", v) for k, v in report["failed_by_reason"].items() if v]
    rows += [("retries", report["retries"]), ("hedges", report["hedges"])]
    rows += [("budget refusals", report["budget_refusals"])]
    rows += [("breaker transitions", report["breaker_transitions"])]
    for name, value in rows:
        share = f"{100.0 * value / sent:.1f}%" if name != "sent" else ""
        outcomes.add_row(name, str(value), share)
    console.print(outcomes)

    columns = ("target rate", "achieved rate", "throughput", "duration s", "max send lag ms")
    rates = table((c, "right") for c in columns)
    rates.add_row(
        f"{report['target_rate']:.1f}",
        f"{report['achieved_rate']:.1f}",
        f"{report['throughput']:.1f}",
        f"{report['duration_s']:.2f}",
        f"{report['max_send_lag_ms']:.2f}",
    )
    console.print(rates)

    latency = table(
        ["answers", *((c, "right") for c in ("p50", "p95", "p99", "max", "mean"))],
        title="latency ms (from scheduled send)",
    )
    for label, key in (("correct", "latency_ms"), ("all", "latency_all_ms")):
        s = report[key]
        latency.add_row(label, *(_ms(s[c]) for c in ("p50", "p95", "p99", "max", "mean")))
    console.print(latency)
    if report["stop_reason"] != "completed":
        console.print(f"[bold yellow]stopped:[/] {report['stop_reason']}")
