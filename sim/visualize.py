"""Figures of one simulation (`twlb sim --visualize`): the cluster topology with roles,
partitions and failed nodes (networkx + matplotlib); a timeline of leaders or views
(each bar ends when its leader steps down, crashes or is succeeded), faults and commits;
and a message-sequence chart of every message sent in a window of the run (delivered
ones as arrows, lost ones marked), the window narrowed to what the chart can hold and
named exactly in its title."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402

if TYPE_CHECKING:
    from twlb.sim.runner import Simulation

ROLE_COLOURS = {
    "leader": "#d62728",
    "follower": "#1f77b4",
    "down": "#7f7f7f",
    "byzantine": "#9467bd",
}
#: Message-sequence charts are drawn for runs up to this many simulated seconds.
MSC_MAX_SECONDS = 3.0
MSC_MAX_MESSAGES = 300


def network_state_at(
    sim: Simulation, t: float
) -> tuple[set[str], list[tuple[frozenset, frozenset]]]:
    """Which nodes were down and which partitions were in force at time `t`, replayed
    from the network's fault log."""
    down: set[str] = set()
    partitions: list[tuple[frozenset, frozenset]] = []
    for at, action, detail in sim.network.log:
        if at > t:
            break
        if action in ("crash", "crash-stop"):
            down.add(detail)
        elif action == "recover":
            down.discard(detail)
        elif action == "partition":
            partitions.append((frozenset(detail[0]), frozenset(detail[1])))
        elif action == "heal":
            partitions.clear()
    return down, partitions


#: Events by which a leader gives up: Raft's step to another role, Multi-Paxos's
#: stand-down, a PBFT primary's own view change.
STEP_DOWN_EVENTS = frozenset({"stand-down", "view-change"})


def _steps_down(event: tuple[Any, ...]) -> bool:
    kind = event[0] if event else None
    return kind in STEP_DOWN_EVENTS or (kind == "role" and event[1] != "leader")


def leader_intervals(sim: Simulation) -> list[tuple[str, float, float, Any]]:
    """(node, from, to, term or view) for each leadership, ended by the leader's own
    stepping down (`STEP_DOWN_EVENTS`, Raft's role changing, a PBFT primary entering
    another view), its crash, or the end of the run. A leader cut off from the others
    may lead on in its own eyes after a successor is elected: both bars show."""
    n = len(sim.node_ids)
    starts = []
    if sim.config.algorithm == "pbft":
        starts.append((0.0, sim.node_ids[0], 0))  # view 0 is never announced
    for t, node, ev in sim.leadership():
        term = ev[1] if len(ev) > 1 else None
        if ev[0] in ("view", "new_view", "view_change") and isinstance(term, int):
            node = sim.node_ids[term % n]  # PBFT: the primary of view v is replica v mod n
        starts.append((t, node, term))
    own: dict[str, list[tuple[float, tuple[Any, ...]]]] = {}
    for t, node, ev in sim.kernel.events:
        if _steps_down(ev) or (ev and ev[0] == "view"):
            own.setdefault(node, []).append((t, ev))
    for t, action, detail in sim.network.log:
        if action in ("crash", "crash-stop"):
            own.setdefault(detail, []).append((t, ("crash",)))
    end = sim.config.duration
    out = []
    for t, node, term in starts:
        gone = [
            x
            for x, ev in own.get(node, ())
            if x > t and (ev[0] != "view" or ev[1] != term)  # its own entry into its view
        ]
        out.append((node, t, min([end, *gone]), term))
    return out


def leader_at(sim: Simulation, t: float) -> str | None:
    for node, start, stop, _term in leader_intervals(sim):
        if start <= t < stop or (t == stop == sim.config.duration and start < stop):
            return node
    return None


def draw_topology(sim: Simulation, path: Path) -> Path:
    log_times = [t for t, a, _d in sim.network.log if a in ("partition", "crash", "crash-stop")]
    moments = [("during the first fault", log_times[0] + 1e-9)] if log_times else []
    moments.append(("at the end", sim.config.duration))
    fig, axes = plt.subplots(1, len(moments), figsize=(6 * len(moments), 5.5))
    axes = [axes] if len(moments) == 1 else list(axes)
    graph = nx.complete_graph(sim.node_ids)
    pos = nx.circular_layout(graph)
    for ax, (label, t) in zip(axes, moments, strict=True):
        down, partitions = network_state_at(sim, t)
        leader = leader_at(sim, t)
        cut = {frozenset((a, b)) for side_a, side_b in partitions for a in side_a for b in side_b}
        live = [e for e in graph.edges if frozenset(e) not in cut and not (set(e) & down)]
        severed = [e for e in graph.edges if frozenset(e) in cut]
        nx.draw_networkx_edges(graph, pos, edgelist=live, ax=ax, edge_color="#bbbbbb")
        nx.draw_networkx_edges(
            graph, pos, edgelist=severed, ax=ax, edge_color="#d62728", style="dashed"
        )
        colours = []
        for node in sim.node_ids:
            if node in down:
                colours.append(ROLE_COLOURS["down"])
            elif node in sim.config.byzantine:
                colours.append(ROLE_COLOURS["byzantine"])
            elif node == leader:
                colours.append(ROLE_COLOURS["leader"])
            else:
                colours.append(ROLE_COLOURS["follower"])
        nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=900)
        nx.draw_networkx_labels(graph, pos, ax=ax, font_size=8, font_color="white")
        for node in down:
            x, y = pos[node]
            ax.plot([x], [y], marker="x", color="black", markersize=22, markeredgewidth=3)
        title = f"{label} (t={t:.1f}s)"
        if partitions:
            title += "\npartition: " + " | ".join(
                "{" + ",".join(sorted(a)) + "} x {" + ",".join(sorted(b)) + "}"
                for a, b in partitions
            )
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=r)
        for r, c in ROLE_COLOURS.items()
    ]
    handles.append(plt.Line2D([], [], color="#d62728", linestyle="dashed", label="cut link"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"{sim.config.algorithm}: {len(sim.node_ids)} nodes, seed {sim.config.seed}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_timeline(sim: Simulation, path: Path) -> Path:
    nodes = sim.node_ids
    row = {node: i for i, node in enumerate(nodes)}
    end = sim.config.duration
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.5 * len(nodes)))
    # failed periods per node
    crashed_at: dict[str, float] = {}
    for t, action, detail in sim.network.log:
        if action in ("crash", "crash-stop"):
            crashed_at[detail] = t
        elif action == "recover" and detail in crashed_at:
            start = crashed_at.pop(detail)
            ax.barh(row[detail], t - start, left=start, color="#cccccc")
    for node, t in crashed_at.items():
        ax.barh(row[node], end - t, left=t, color="#cccccc", label="down")
    # partitions shaded across the chart
    open_at = None
    for t, action, _d in sim.network.log:
        if action == "partition" and open_at is None:
            open_at = t
        elif action == "heal" and open_at is not None:
            ax.axvspan(open_at, t, color="#ffdddd", zorder=0)
            open_at = None
    if open_at is not None:
        ax.axvspan(open_at, end, color="#ffdddd", zorder=0)
    for node, start, stop, term in leader_intervals(sim):
        ax.barh(row[node], stop - start, left=start, height=0.5, color=ROLE_COLOURS["leader"])
        ax.text(start, row[node] + 0.3, f"{term}", fontsize=6)
    commits = [
        (t, node) for t, node, ev in sim.kernel.events if ev and ev[0] == "commit" and node in row
    ]
    if commits:
        ax.scatter(
            [t for t, _n in commits],
            [row[n] - 0.3 for _t, n in commits],
            marker="|",
            s=12,
            color="#2ca02c",
            label="commit",
        )
    oks = [e.time for e in sim.history if e.type.value == "ok" and e.time is not None]
    ax.scatter(oks, [-1] * len(oks), marker="|", s=20, color="black", label="client ok")
    ax.set_yticks([-1, *range(len(nodes))], ["clients", *nodes])
    ax.set_xlim(0, end)
    ax.set_xlabel("virtual time (s)")
    ax.set_title(
        "leaders/views (red, labelled by term or view), commits (green), client completions; pink: partition, grey: down"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def message_window(
    sim: Simulation, window: tuple[float, float] | None = None
) -> tuple[float, float, list[tuple[float, float | None, str, str, str]]]:
    """Every message sent in a window of virtual time, as (sent, delivered or None when
    it was lost, source, destination, type): the window asked (default the first
    `MSC_MAX_SECONDS`), narrowed from its end when it holds more than
    `MSC_MAX_MESSAGES` sends, so that the chart shows all of the window it names."""
    trace = sim.kernel.trace or []
    start, stop = window if window is not None else (0.0, MSC_MAX_SECONDS)
    stop = min(stop, sim.config.duration)
    sent_at = [entry[0] for entry in trace if entry[1] == "send" and start <= entry[0] <= stop]
    if len(sent_at) > MSC_MAX_MESSAGES:
        stop = sent_at[MSC_MAX_MESSAGES - 1]
        while sum(1 for at in sent_at if at <= stop) > MSC_MAX_MESSAGES and stop > start:
            stop = max(at for at in sent_at if at < stop)  # several sends at one instant
    pending: dict[tuple[str, str, int], list[int]] = {}
    rows: list[list[Any]] = []
    for entry in trace:
        at, kind = entry[0], entry[1]
        if kind == "send" and start <= at <= stop:
            pending.setdefault((entry[2], entry[3], id(entry[4])), []).append(len(rows))
            rows.append([at, None, entry[2], entry[3], type(entry[4]).__name__])
        elif kind == "deliver":
            queue = pending.get((entry[2], entry[3], id(entry[4])))
            if queue:
                rows[queue.pop(0)][1] = at
    return start, stop, [tuple(row) for row in rows]  # type: ignore[misc]


def draw_message_sequence(
    sim: Simulation, path: Path, window: tuple[float, float] | None = None
) -> Path | None:
    if not sim.kernel.trace:
        return None
    start, stop, rows = message_window(sim, window)
    col = {node: i for i, node in enumerate(sim.node_ids)}
    delivered = [r for r in rows if r[1] is not None]
    bottom = max([stop, *(r[1] for r in delivered)])
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(col), 10))
    for node, x in col.items():
        ax.plot([x, x], [start, bottom], color="#999999", linewidth=0.8)
        ax.text(x, start - 0.02 * (bottom - start), node, ha="center", va="bottom", fontsize=8)
    ax.axhline(stop, color="#999999", linestyle="dotted", linewidth=0.8)
    names = sorted({r[4] for r in rows})
    cmap = plt.get_cmap("tab10")
    colour = {name: cmap(i % 10) for i, name in enumerate(names)}
    for sent, got, src, dst, name in rows:
        if src not in col or dst not in col:
            continue
        if got is not None:
            ax.annotate(
                "",
                xy=(col[dst], got),
                xytext=(col[src], sent),
                arrowprops={"arrowstyle": "->", "color": colour[name], "lw": 0.7},
            )
        else:  # lost (loss, a cut link, a node down): a stub towards its destination
            x = col[src] + 0.3 * (col[dst] - col[src])
            ax.plot([col[src], x], [sent, sent], color=colour[name], lw=0.7, linestyle="dashed")
            ax.plot([x], [sent], marker="x", color=colour[name], markersize=4)
    span = bottom - start or 1.0
    ax.set_ylim(bottom + 0.02 * span, start - 0.05 * span)
    ax.set_xlim(-0.5, len(col) - 0.5)
    ax.set_xticks([])
    ax.set_ylabel("virtual time (s)")
    handles = [plt.Line2D([], [], color=colour[n], label=n) for n in names]
    handles.append(plt.Line2D([], [], color="black", marker="x", linestyle="dashed", label="lost"))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_title(
        f"every message sent in {start:g}-{stop:.3f} s: {len(rows)} "
        f"({len(delivered)} delivered, {len(rows) - len(delivered)} lost)"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_all(
    sim: Simulation, directory: Path, window: tuple[float, float] | None = None
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{sim.config.algorithm}-seed{sim.config.seed}"
    paths = [
        draw_topology(sim, directory / f"{stem}-topology.png"),
        draw_timeline(sim, directory / f"{stem}-timeline.png"),
    ]
    msc = draw_message_sequence(sim, directory / f"{stem}-messages.png", window)
    if msc is not None:
        paths.append(msc)
    return paths
