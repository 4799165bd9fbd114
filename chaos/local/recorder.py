"""Chaos to training data: record a running cluster's feature windows, label them from
the chaos journals, and write the collector's dataset.

While experiments run, `record` polls the balancer's `/trust` (`twlb.chaos.run`'s
`TrustPoller`) and keeps one feature row per backend per trust window, and polls every
node's control endpoint for the ground truth (`control_truth`). Each
reading is appended to a JSON-lines file at once, so a recording stopped by a signal is
still whole up to its last line.

`build_rows` then labels every recorded window: a window the experiments had a node
killed or faulted for (from the journals, `twlb.chaos.journal`) takes that class;
any other window takes the ground truth when it held over the whole window, and is left
out when the truth changed inside it (its label would be a guess, as in the collector).
The rows have exactly the columns of `twlb.ml.dataset`, so `twlb train` reads them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from chaoslib.exceptions import ActivityFailed
from twlb.balancer.features import FEATURE_NAMES
from twlb.chaos.journal import FeatureWindow, window_intervals
from twlb.chaos.run import Log, TrustPoller, TruthTimeline, control_truth
from twlb.chaos.state import load_cluster
from twlb.ml.dataset import Sample, WindowRow
from twlb.processes.managed import pid_alive

RECORDING_VERSION = 1
#: How often /trust is polled for a new trust tick.
TRUST_POLL_S = 0.1
#: How often every node's ground truth is read.
TRUTH_POLL_S = 0.5
#: Margin before a window in which the truth must also have held (as the collector's).
TRUTH_GUARD_S = 1.0


class RecordingError(ValueError):
    """A recording file that cannot be used; the message says why."""


@dataclass
class Recording:
    """One run's feature windows and truth timeline, read back from a recording file."""

    run_id: str
    seed: int
    cluster: str
    window_s: float
    t0: float
    names: dict[str, str]  # backend URL -> node name
    samples: list[Sample] = field(default_factory=list)
    truth: TruthTimeline = field(default_factory=TruthTimeline)


class _Writer:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("w")

    def write(self, doc: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(doc, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def record(
    state_dir: str | Path,
    out: str | Path,
    run_id: str,
    seed: int,
    max_duration_s: float,
    stop: threading.Event | None = None,
    log: Log = print,
) -> int:
    """Record until `stop` is set, `max_duration_s` passes or the runtime stops; returns
    the number of windows recorded."""
    cluster = load_cluster(str(state_dir))
    stop = stop or threading.Event()
    with httpx.Client(timeout=2.0) as client:
        try:
            r = client.get(cluster.admin_url + "/trust")
            r.raise_for_status()
            window_s = float(r.json()["window_s"])
        except (httpx.HTTPError, ValueError, KeyError) as err:
            raise ActivityFailed(
                f"cannot read the feature window from {cluster.admin_url}/trust: {err!r}"
            ) from None
        writer = _Writer(Path(out))
        t0 = time.time()
        writer.write(
            {
                "kind": "run",
                "version": RECORDING_VERSION,
                "run_id": run_id,
                "seed": seed,
                "cluster": cluster.name,
                "window_s": window_s,
                "t0": t0,
                "names": {n.url: n.name for n in cluster.nodes},
            }
        )
        poller = TrustPoller(cluster.admin_url)
        last_truth: dict[str, tuple[str, str]] = {}
        last_sample = 0.0
        next_truth = 0.0
        windows = 0
        try:
            while not stop.is_set() and time.time() - t0 < max_duration_s:
                if not pid_alive(cluster.runtime_pid):
                    log("the runtime has stopped; recording ends")
                    break
                feats = poller.poll()
                tick = poller.changed_at
                # One window per trust window: consecutive rows then share no events.
                if feats and tick > last_sample and tick - last_sample >= 0.95 * window_s:
                    writer.write({"kind": "sample", "at": tick, "features": feats})
                    last_sample = tick
                    windows += 1
                now = time.time()
                if now >= next_truth:
                    next_truth = now + TRUTH_POLL_S
                    for n in cluster.nodes:
                        seen = control_truth(n.url, cluster.control_token, client)
                        if last_truth.get(n.name) != seen:
                            last_truth[n.name] = seen
                            writer.write(
                                {
                                    "kind": "truth",
                                    "node": n.name,
                                    "at": now,
                                    "label": seen[0],
                                    "fault": seen[1],
                                }
                            )
                stop.wait(TRUST_POLL_S)
        finally:
            poller.close()
            writer.close()
    return windows


def read_recording(path: str | Path) -> Recording:
    """Load a recording file written by `record`."""
    p = Path(path)
    try:
        lines = p.read_bytes().splitlines()
    except OSError as err:
        raise RecordingError(f"{p}: cannot read: {err.strerror}") from None
    try:
        docs = [json.loads(line) for line in lines if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordingError(f"{p}: not JSON lines: {err}") from None
    if not docs or not all(isinstance(d, dict) for d in docs) or docs[0].get("kind") != "run":
        raise RecordingError(f"{p}: not a recording (no 'run' header line)")
    head = docs[0]
    if head.get("version") != RECORDING_VERSION:
        raise RecordingError(f"{p}: recording version {head.get('version')} is not supported")
    try:
        rec = Recording(
            run_id=str(head["run_id"]),
            seed=int(head["seed"]),
            cluster=str(head["cluster"]),
            window_s=float(head["window_s"]),
            t0=float(head["t0"]),
            names=dict(head["names"]),
        )
        for d in docs[1:]:
            if d.get("kind") == "sample":
                rec.samples.append(Sample(float(d["at"]), d["features"]))
            elif d.get("kind") == "truth":
                rec.truth.observe(d["node"], float(d["at"]), d["label"], d["fault"])
    except (KeyError, TypeError, ValueError) as err:
        raise RecordingError(f"{p}: not a recording: a malformed line ({err!r})") from None
    return rec


def build_rows(
    recording: Recording,
    journals: Sequence[Mapping[str, Any]],
    min_overlap: float = 0.25,
) -> list[WindowRow]:
    """Label a recording's windows from the journals, else from the ground truth."""
    cells: list[tuple[Sample, str, Mapping[str, float]]] = []
    for sample in recording.samples:
        for url, feats in sample.direct.items():
            cells.append((sample, recording.names.get(url, url), feats))
    windows: Iterable[FeatureWindow] = (
        FeatureWindow(node, s.at - recording.window_s, s.at) for s, node, _ in cells
    )
    chaos = window_intervals(journals, windows, min_overlap)
    rows = []
    for (sample, node, feats), interval in zip(cells, chaos, strict=True):
        if interval is not None:
            label, fault = interval.label.value, interval.fault
        else:
            held = recording.truth.stable(
                node, sample.at - recording.window_s - TRUTH_GUARD_S, sample.at
            )
            if held is None:
                continue
            label, fault = held
        rows.append(
            WindowRow(
                run_id=recording.run_id,
                seed=recording.seed,
                node=node,
                time=round(sample.at - recording.t0, 3),
                features=tuple(float(feats[n]) for n in FEATURE_NAMES),
                label=label,
                fault=fault,
            )
        )
    return rows


def dataset_metadata(recordings: Sequence[Recording], journals: Sequence[Mapping]) -> dict:
    titles = sorted({str((j.get("experiment") or {}).get("title", "")) for j in journals})
    return {
        "source": "chaos",
        "window_s": repr(recordings[0].window_s) if recordings else "",
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "description": (
            f"{len(recordings)} embedded-runtime runs under Chaos Toolkit experiments; "
            "windows labelled by the journals' kill/fault intervals, else by ground truth"
        ),
        "experiments": json.dumps(titles),
        "runs": json.dumps([{"run_id": r.run_id, "seed": r.seed} for r in recordings]),
    }
