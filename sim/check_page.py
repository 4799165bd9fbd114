"""The page `twlb sim check --html FILE` writes: one self-contained HTML file (no script,
style or font from anywhere else) that draws a checked history as Porcupine's
visualisation does.

Each key is drawn on its own: one row per client process, each operation a bar from its
invocation to its completion (an operation whose outcome is unknown runs to the right
edge, dashed). The time axis is the order of events, with each distinct instant one
step (as Porcupine maps timestamps to ranks), so short operations stay readable beside
long ones. The axis is labelled with the recorded times where the history has them,
with the file's line numbers otherwise.

A linearizable key shows its linearization: a point inside each bar where the operation
takes effect, numbered in order and joined by a line. A key that is not linearizable
shows the longest linearizable prefix the search found (green, numbered, with the state
after each step in a table), the operation no linearization can place (red, with the
state it met), and a dashed line at that operation's completion: no linearization gets
past it. Keys stopped once another failed, or not decided within the budgets, are drawn
without a linearization.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twlb.sim.checker import Progress, Verdict, format_bytes, step
from twlb.sim.history import HistoryEvent, Op, pair_operations

ROW_H = 30
BAR_H = 20
STEP_W = 18  # pixels per distinct instant
LEFT = 12  # the timeline's left margin
LABELS_W = 96  # the process labels, beside the timeline
TOP = 34  # room for the axis
MIN_W = 720


def describe_value(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + " ".join(describe_value(v) for v in value) + "]"
    return str(value)


def describe_call(op: Op) -> str:
    """The operation as a call and its result: `read() -> 3`, `cas(1, 2) -> fail`."""
    if op.f == "read":
        return f"read() \u2192 {describe_value(op.output)}"
    if op.f == "cas":
        expected, new = op.value
        result = "?" if op.output is None else "ok" if op.output else "fail"
        return f"cas({describe_value(expected)}, {describe_value(new)}) \u2192 {result}"
    result = " \u2192 ?" if op.end is None else ""
    return f"{op.f}({describe_value(op.value)}){result}"


def describe_operation(op: Op) -> str:
    """One line for the terminal: where it is, who ran it, what it did."""
    lines = f"line {op.line}" if op.line else f"event {op.start + 1}"
    if op.end_line:
        lines += f"-{op.end_line}"
    key = "" if op.key is None else f" on key {op.key!r}"
    return f"{lines}: process {op.process} {describe_call(op)}{key}"


def _ranks(events: Sequence[HistoryEvent], positions: Sequence[int]) -> dict[int, int]:
    """Each event position -> its step on the axis. Events at one recorded time share a
    step when the history has times; otherwise each event is its own step."""
    ranks: dict[int, int] = {}
    last: Any = object()
    rank = -1
    for p in positions:
        t = events[p].time
        if t is None or t != last:
            rank += 1
        ranks[p] = rank
        last = t
    return ranks


def _linearization_points(
    ops: Sequence[Op], order: Sequence[int], x_start: dict[int, float], x_end: dict[int, float]
) -> dict[int, float]:
    """A point inside each operation's bar, in the order given, each at or after the one
    before (a linearization respects real time, so such points exist)."""
    points: dict[int, float] = {}
    last = -1.0
    for i in order:
        lo, hi = x_start[i], x_end[i]
        x = max(lo + 3, last + 3)
        if x > hi - 2:
            x = max(lo + 1, min(hi - 1, last + 0.5))
        points[i] = x
        last = x
    return points


def _states(ops: Sequence[Op], order: Sequence[int]) -> list[Any]:
    state: Any = None
    out = []
    for i in order:
        _legal, state = step(state, ops[i].f, ops[i].value, ops[i].output)
        out.append(state)
    return out


def _key_svg(
    events: Sequence[HistoryEvent],
    ops: Sequence[Op],
    order: Sequence[int] | None,
    stuck: int | None,
) -> tuple[str, str]:
    """The process labels (they stay put) and the timeline (it scrolls)."""
    positions = sorted({op.start for op in ops} | {op.end for op in ops if op.end is not None})
    ranks = _ranks(events, positions)
    steps = (max(ranks.values()) + 2) if ranks else 2
    width = max(MIN_W, LEFT + steps * STEP_W + 40)
    processes = sorted({op.process for op in ops})
    row = {p: k for k, p in enumerate(processes)}
    height = TOP + len(processes) * ROW_H + 16
    right = width - 20

    def x_of(position: int) -> float:
        return LEFT + ranks[position] * STEP_W + STEP_W / 2

    x_start = {i: x_of(op.start) for i, op in enumerate(ops)}
    x_end = {i: (x_of(op.end) if op.end is not None else right) for i, op in enumerate(ops)}
    placed = set(order or ())
    out = [
        f'<svg class="timeline" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    # axis: times where the history has them, event numbers otherwise
    out.append(f'<line class="axis" x1="{LEFT}" y1="{TOP - 8}" x2="{right}" y2="{TOP - 8}"/>')
    every = max(1, 120 // STEP_W)
    for k, p in enumerate(positions):
        if k % every:
            continue
        t, line = events[p].time, events[p].line
        label = f"{t:.3f} s" if t is not None else f"line {line}" if line else f"#{p + 1}"
        x = x_of(p)
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{TOP - 14}">{html.escape(label)}</text>'
            f'<line class="tickmark" x1="{x:.1f}" y1="{TOP - 10}" x2="{x:.1f}" y2="{TOP - 6}"/>'
        )
    labels = [
        f'<svg class="labels" width="{LABELS_W}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for p, k in row.items():
        y = TOP + k * ROW_H
        labels.append(f'<text class="process" x="4" y="{y + BAR_H / 2 + 4}">process {p}</text>')
        out.append(
            f'<line class="lane" x1="{LEFT}" y1="{y + ROW_H - 5}" x2="{right}" '
            f'y2="{y + ROW_H - 5}"/>'
        )
    labels.append("</svg>")
    for i, op in enumerate(ops):
        y = TOP + row[op.process] * ROW_H
        x0, x1 = x_start[i], max(x_end[i], x_start[i] + 6)
        if stuck is not None and i == stuck:
            cls = "op stuck"
        elif order is None:
            cls = "op"
        elif i in placed:
            cls = "op placed"
        else:
            cls = "op unplaced"
        if op.end is None:
            cls += " unknown"
        tip = describe_operation(op)
        if events[op.start].time is not None:
            end_t = "?" if op.end is None else f"{events[op.end].time:.6f}"
            tip += f" (invoked at {events[op.start].time:.6f} s, completed at {end_t})"
        text = describe_call(op)
        out.append(
            f'<g class="{cls}" data-op="{i}" data-line="{op.line or ""}">'
            f"<title>{html.escape(tip)}</title>"
            f'<rect x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="{BAR_H}" rx="3"/>'
            f'<svg x="{x0 + 3:.1f}" y="{y}" width="{max(0.0, x1 - x0 - 6):.1f}" '
            f'height="{BAR_H}"><text x="0" y="{BAR_H - 6}">{html.escape(text)}</text></svg>'
            "</g>"
        )
    if order:
        points = _linearization_points(ops, order, x_start, x_end)
        path = " ".join(
            f"{points[i]:.1f},{TOP + row[ops[i].process] * ROW_H + BAR_H / 2:.1f}" for i in order
        )
        out.append(f'<polyline class="order" points="{path}"/>')
        for n, i in enumerate(order, 1):
            cx, cy = points[i], TOP + row[ops[i].process] * ROW_H + BAR_H / 2
            out.append(
                f'<g class="point" data-step="{n}" data-op="{i}">'
                f"<title>step {n}: {html.escape(describe_call(ops[i]))}</title>"
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5"/></g>'
            )
    if stuck is not None and ops[stuck].end is not None:
        x = x_end[stuck]
        out.append(
            f'<line class="frontier" x1="{x:.1f}" y1="{TOP - 8}" x2="{x:.1f}" '
            f'y2="{height - 6}"><title>no linearization gets past this completion</title></line>'
        )
        # the failing operation named in full beside its bar, over whatever is there
        text = f"{describe_call(ops[stuck])}: cannot be placed"
        y = TOP + row[ops[stuck].process] * ROW_H
        w = 7 * len(text) + 10
        out.append(
            f'<g class="callout"><rect x="{x + 6:.1f}" y="{y}" width="{w}" height="{BAR_H}" '
            f'rx="3"/><text x="{x + 11:.1f}" y="{y + BAR_H - 6}">{html.escape(text)}</text></g>'
        )
    out.append("</svg>")
    return "".join(labels), "".join(out)


def _prefix_table(ops: Sequence[Op], longest: Sequence[int], stuck: int) -> str:
    states = _states(ops, longest)
    rows = []
    for n, (i, state) in enumerate(zip(longest, states, strict=True), 1):
        op = ops[i]
        rows.append(
            f'<tr class="step" data-op="{i}"><td>{n}</td><td>{op.process}</td>'
            f"<td>{html.escape(describe_call(op))}</td>"
            f"<td>{html.escape(describe_value(state))}</td>"
            f"<td>{op.line or ''}</td></tr>"
        )
    last = states[-1] if states else None
    op = ops[stuck]
    rows.append(
        f'<tr class="stuck" data-op="{stuck}"><td>\u2717</td><td>{op.process}</td>'
        f"<td>{html.escape(describe_call(op))}</td>"
        f"<td>cannot be placed: the state here is {html.escape(describe_value(last))}, "
        f"and no other linearization gets past this operation's completion</td>"
        f"<td>{op.line or ''}</td></tr>"
    )
    return (
        '<table class="prefix"><thead><tr><th>#</th><th>process</th><th>operation</th>'
        "<th>state after</th><th>line</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


#: The one script: scroll each timeline so that the completion no linearization gets past
#: is in view (a long history is wider than the window).
SCRIPT = """
for (const box of document.querySelectorAll('.scroll')) {
  const line = box.querySelector('line.frontier');
  if (line) box.scrollLeft = Math.max(0, line.x1.baseVal.value - box.clientWidth * 0.75);
}
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d232b; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 0; display: inline; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; }
.verdict.ok { background: #d9f2de; color: #17612a; }
.verdict.bad { background: #fbdcdc; color: #8f1c1c; }
.verdict.undecided { background: #fff0c7; color: #7a5300; }
.summary { color: #4a5563; margin: 6px 0 18px; }
pre.progress { background: #fff8e3; padding: 8px; border-radius: 6px; }
details { margin: 14px 0; border: 1px solid #dde2e8; border-radius: 6px; padding: 8px 10px; }
summary { cursor: pointer; }
.lanes { display: flex; margin-top: 8px; }
.lanes svg.labels { flex: none; }
.scroll { overflow-x: auto; flex: 1; }
svg.timeline text { font: 11px ui-monospace, monospace; }
svg.labels text { font: 11px ui-monospace, monospace; fill: #4a5563; }
svg.timeline .tick { fill: #7b8694; text-anchor: middle; font-size: 10px; }
svg.timeline .axis, svg.timeline .tickmark { stroke: #9aa4b1; }
svg.timeline .lane { stroke: #eef1f4; }
.op rect { fill: #e3e8ee; stroke: #9aa4b1; }
.op.placed rect { fill: #d6f0da; stroke: #3f9a53; }
.op.unplaced rect { fill: #f1f3f5; stroke: #c3cad3; }
.op.stuck rect { fill: #f9c9c9; stroke: #c62828; stroke-width: 2; }
.op.unknown rect { stroke-dasharray: 4 3; }
.op text { fill: #1d232b; }
.op:hover rect { stroke: #1d232b; stroke-width: 2; }
polyline.order { fill: none; stroke: #2e7d32; stroke-width: 1.2; stroke-opacity: .6; }
.point circle { fill: #2e7d32; }
.callout rect { fill: #fff; stroke: #c62828; }
.callout text { fill: #8f1c1c; font-weight: 600; }
line.frontier { stroke: #c62828; stroke-width: 1.5; stroke-dasharray: 6 4; }
table.prefix { border-collapse: collapse; margin-top: 10px; font-size: 13px; }
table.prefix td, table.prefix th { border-bottom: 1px solid #e5e9ee; padding: 3px 10px; }
table.prefix th { text-align: left; color: #4a5563; }
table.prefix tr.stuck td { background: #fde7e7; color: #8f1c1c; font-weight: 600; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 14px; height: 10px; border: 1px solid; margin-right: 4px; }
"""


def render_page(
    history: Sequence[HistoryEvent],
    model: str,
    verdict: Verdict | None,
    progress: Progress | None,
    source: str = "history",
) -> str:
    events = list(history)
    if verdict is not None:
        by_key = verdict.operations_by_key
    else:
        by_key = defaultdict(list)
        for op in pair_operations(events):
            by_key[op.key].append(op)
    keys = sorted(by_key, key=lambda k: (k is not None, str(k)))
    if verdict is not None and verdict.failing_key in by_key and not verdict.linearizable:
        keys.remove(verdict.failing_key)
        keys.insert(0, verdict.failing_key)
    status = {k.key: k.linearizable for k in verdict.keys} if verdict else {}
    if verdict is None:
        badge = '<span class="verdict undecided">undecided</span>'
    elif verdict.linearizable:
        badge = '<span class="verdict ok">linearizable</span>'
    else:
        badge = '<span class="verdict bad">not linearizable</span>'
    n_ops = sum(len(v) for v in by_key.values())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(source)}: linearizability</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(source)}</h1>",
        f'<div id="verdict">{badge}</div>',
        f'<p class="summary">{model} model, {n_ops} operations on {len(keys)} key(s), '
        f"{len(events)} events",
    ]
    if verdict is not None:
        states = sum(k.states for k in verdict.keys)
        parts.append(
            f", {states:,} configurations explored, peak memory "
            f"{format_bytes(verdict.peak_memory)}, {verdict.seconds:.3f} s"
        )
    parts.append(".</p>")
    if progress is not None:
        parts.append(
            "<p>The check stopped at a budget before a verdict. How far it got:</p>"
            f'<pre class="progress">{html.escape(progress.describe())}</pre>'
        )
    parts.append(
        '<p class="legend">'
        '<span><i class="swatch" style="background:#d6f0da;border-color:#3f9a53"></i>'
        "placed by the (longest) linearization</span>"
        '<span><i class="swatch" style="background:#f9c9c9;border-color:#c62828"></i>'
        "cannot be placed</span>"
        '<span><i class="swatch" style="background:#f1f3f5;border-color:#c3cad3"></i>'
        "not reached</span>"
        '<span><i class="swatch" style="border-style:dashed"></i>outcome unknown</span>'
        "</p>"
    )
    for key in keys:
        ops = by_key[key]
        name = "the register" if key is None else f"key {key!r}"
        order: list[int] | None = None
        stuck = None
        table = ""
        if verdict is None:
            word = "not decided"
        elif verdict.linearizable:
            word = "linearizable"
            order = verdict.orders.get(key)
        elif key == verdict.failing_key:
            word = "NOT linearizable"
            order, stuck = verdict.longest, verdict.stuck
            if stuck is not None:
                table = (
                    f"<p>The longest linearizable prefix places {len(order)} of {len(ops)} "
                    f"operations; then <b>{html.escape(describe_operation(ops[stuck]))}</b> "
                    "cannot be placed.</p>" + _prefix_table(ops, order, stuck)
                )
        elif status.get(key):
            word = "linearizable"
        else:
            word = "not decided (stopped once another key failed)"
        labels, timeline = _key_svg(events, ops, order, stuck)
        opened = " open" if (key == keys[0] or len(keys) <= 3) else ""
        parts.append(
            f'<details class="key" data-key="{html.escape(str(key))}" '
            f'data-verdict="{html.escape(word)}"{opened}>'
            f"<summary><h2>{html.escape(name)}</h2>: {html.escape(word)}, "
            f"{len(ops)} operations</summary>"
            f'<div class="lanes">{labels}<div class="scroll">{timeline}</div></div>'
            f"{table}</details>"
        )
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    return "".join(parts)


def write_page(
    path: Path,
    history: Sequence[HistoryEvent],
    model: str,
    verdict: Verdict | None,
    progress: Progress | None,
    source: str = "history",
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(history, model, verdict, progress, source))
    return path


__all__ = ["describe_call", "describe_operation", "render_page", "write_page"]
