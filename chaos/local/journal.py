"""Chaos journals to labels: when did an experiment have which node killed or faulted.

A Chaos Toolkit journal records every activity it ran (hypothesis probes, the method,
rollbacks) with its start and end times and its output. The actions and probes of
`twlb.chaos` say in their output what they did to which node:

- `{"node": N, "chaos_class": C, "at": T}`: from time T, node N is in class C
  (killed: `crash`; turned byzantine: `byzantine`; slowed: `delay`; ...);
- `{"node": N, "restored": true, "at": T}`: from time T, node N is itself again.

chaostoolkit-kubernetes' `terminate_pods` answers the names of the pods it deleted; each
pod's node comes from its name (`<cluster>-node-<i>-<replicaset hash>-<pod hash>`) and
its class is `crash`. An interval still open when the journal ends closes at its end.

`label_windows` then gives each feature window the class of the chaos interval that
covers enough of it, or None where the experiment did nothing to that node (the caller
falls back to the ground truth at that time).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from twlb.spec import NodeClass

#: A pod created by a node's Deployment: `<cluster>-node-<i>-<rs hash>-<pod hash>`.
_POD_NAME = re.compile(r"^(?P<node>.+-node-\d+)-[a-z0-9]+-[a-z0-9]+$")

#: Functions whose output is a list of deleted pod names (chaostoolkit-kubernetes).
_POD_KILLERS = frozenset({"terminate_pods", "delete_pods"})


class JournalError(ValueError):
    """A file or document that is not a usable chaos journal; the message says why."""


@dataclass(frozen=True)
class ChaosInterval:
    """Node `node` was in class `label` from `start` to `end` (epoch seconds) because of
    the activity named `activity` of the experiment titled `experiment`."""

    node: str
    label: NodeClass
    start: float
    end: float
    activity: str
    experiment: str
    fault: str  # the fault type that put it there ("down" for a killed node)

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(self.end, end) - max(self.start, start))


@dataclass(frozen=True)
class FeatureWindow:
    """One backend's feature window, [start, end] in epoch seconds."""

    node: str
    start: float
    end: float


def read_journal(path: str | Path) -> dict[str, Any]:
    """Load a journal file written by `chaos run --journal-path`."""
    p = Path(path)
    try:
        doc = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise JournalError(f"{p}: no such journal") from None
    except OSError as err:
        raise JournalError(f"{p}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise JournalError(f"{p}: not a chaos journal: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise JournalError(f"{p}: not JSON: {err}") from None
    _check_journal(doc, str(p))
    return doc


def _iso_time(value: str) -> str:
    datetime.fromisoformat(value)  # a ValueError names a stamp that is not ISO 8601
    return value


_Stamp = Annotated[str, AfterValidator(_iso_time)]


class _Loose(BaseModel):
    """The parts of a journal this module reads, typed; everything else is let through."""

    model_config = ConfigDict(extra="allow")


class _ActivityDef(_Loose):
    name: str = ""
    provider: dict[str, Any] | None = None


class _ActivityRun(_Loose):
    activity: _ActivityDef | None = None
    status: str | None = None
    start: _Stamp | None = None
    end: _Stamp | None = None
    tolerance_met: bool | None = None
    exception: list[str] | None = None


class _SteadyState(_Loose):
    probes: list[_ActivityRun] | None = None
    steady_state_met: bool | None = None


class _SteadyStates(_Loose):
    before: _SteadyState | None = None
    after: _SteadyState | None = None
    during: list[_ActivityRun] | None = None


class _JournalShape(_Loose):
    experiment: dict[str, Any]
    run: list[_ActivityRun]
    start: _Stamp
    end: _Stamp
    status: str | None = None
    steady_states: _SteadyStates | None = None
    rollbacks: list[_ActivityRun] | None = None


def _check_journal(doc: Any, where: str) -> None:
    if not isinstance(doc, dict) or "experiment" not in doc or "run" not in doc:
        raise JournalError(f"{where}: not a chaos journal (no 'experiment' and 'run' entries)")
    for key in ("start", "end"):
        if key not in doc:
            raise JournalError(f"{where}: journal has no '{key}' time")
    try:
        _JournalShape.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ").split(" or instance of ")[0]
        raise JournalError(f"{where}: not a chaos journal: {at}: {msg}") from None


def _epoch(stamp: str) -> float:
    # chaoslib writes ISO 8601; older versions wrote naive UTC without an offset.
    t = datetime.fromisoformat(stamp)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def steady_state_problems(journal: Mapping[str, Any]) -> list[str]:
    """Why a journal does not show a clean run: not completed, or a steady state (before
    or after the method) not met, naming each probe out of tolerance. Empty when clean.

    Chaos Toolkit may end a run whose steady state was not met before the method with
    status "completed" and exit status 0, so both the status and the states are read."""
    problems = []
    if journal.get("status") != "completed":
        problems.append(f"status is {journal.get('status')!r}, not 'completed'")
    steady = journal.get("steady_states") or {}
    for phase in ("before", "after"):
        state = steady.get(phase)
        if not state:
            problems.append(f"no steady-state check {phase} the method")
            continue
        for p in state.get("probes") or []:
            if not p.get("tolerance_met"):
                why = (p.get("exception") or [""])[-1].strip() or f"output {p.get('output')!r}"
                name = (p.get("activity") or {}).get("name") or "a probe"
                problems.append(f"{phase}: {name} not met ({why})")
        if not state.get("steady_state_met") and not any(x.startswith(phase) for x in problems):
            problems.append(f"{phase}: steady state not met")
    return problems


def journal_entries(journal: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every activity run of a journal (hypothesis before, method, hypothesis after,
    rollbacks), in the order they started."""
    runs: list[dict[str, Any]] = []
    steady = journal.get("steady_states") or {}
    for phase in ("before", "after"):
        runs.extend((steady.get(phase) or {}).get("probes") or [])
    runs.extend(steady.get("during") or [])
    runs.extend(journal.get("run") or [])
    runs.extend(journal.get("rollbacks") or [])
    yield from sorted((r for r in runs if "start" in r), key=lambda r: _epoch(r["start"]))


#: The fault column of a killed node, as the collector names a node that does not answer.
KILLED_FAULT = "down"


def _effects(
    entry: Mapping[str, Any],
) -> Iterator[tuple[str, NodeClass | None, str, float]]:
    """(node, class or None for restored, fault, at) for each thing an activity did."""
    if entry.get("status") != "succeeded":
        return
    out = entry.get("output")
    at_end = _epoch(entry.get("end") or entry["start"])
    func = ((entry.get("activity") or {}).get("provider") or {}).get("func")
    if isinstance(out, dict) and isinstance(out.get("node"), str):
        at = float(out["at"]) if isinstance(out.get("at"), int | float) else at_end
        if out.get("chaos_class") is not None:
            label = NodeClass(out["chaos_class"])
            fault = (
                (out.get("fault") or {}).get("type") if isinstance(out.get("fault"), dict) else None
            )
            yield out["node"], label, fault or KILLED_FAULT, at
        elif out.get("restored") is True:
            yield out["node"], None, "", at
    elif func in _POD_KILLERS and isinstance(out, list):
        for pod in out:
            m = _POD_NAME.match(str(pod))
            if m:
                yield m["node"], NodeClass.CRASH, KILLED_FAULT, at_end


def chaos_intervals(journal: Mapping[str, Any]) -> list[ChaosInterval]:
    """The intervals during which the experiment had a node killed or faulted."""
    _check_journal(journal, "journal")
    title = str((journal.get("experiment") or {}).get("title", ""))
    journal_end = _epoch(journal["end"])
    open_: dict[str, tuple[NodeClass, float, str, str]] = {}
    done: list[ChaosInterval] = []

    def close(node: str, at: float) -> None:
        if node in open_:
            label, start, name, fault = open_.pop(node)
            done.append(ChaosInterval(node, label, start, max(start, at), name, title, fault))

    for entry in journal_entries(journal):
        name = str((entry.get("activity") or {}).get("name", ""))
        for node, label, fault, at in _effects(entry):
            close(node, at)
            if label is not None and label is not NodeClass.HEALTHY:
                open_[node] = (label, at, name, fault)
    for node in list(open_):
        close(node, journal_end)
    return sorted(done, key=lambda i: (i.start, i.node))


def window_intervals(
    journal: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    windows: Iterable[FeatureWindow],
    min_overlap: float = 0.25,
) -> list[ChaosInterval | None]:
    """For each window, the chaos interval (on its node) overlapping it most, when that
    overlap is at least `min_overlap` of the window's length, else None.

    A node killed for the last tenth of a window has barely shown it in that window's
    features yet; such a window is left to the ground truth (which then sees a change
    inside the window, so the collector drops it)."""
    journals = [journal] if isinstance(journal, Mapping) else list(journal)
    by_node: dict[str, list[ChaosInterval]] = {}
    for j in journals:
        for interval in chaos_intervals(j):
            by_node.setdefault(interval.node, []).append(interval)
    found: list[ChaosInterval | None] = []
    for w in windows:
        length = max(w.end - w.start, 1e-9)
        best = max(by_node.get(w.node, []), key=lambda i: i.overlap(w.start, w.end), default=None)
        if best is not None and best.overlap(w.start, w.end) >= min_overlap * length:
            found.append(best)
        else:
            found.append(None)
    return found


def label_windows(
    journal: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    windows: Iterable[FeatureWindow],
    min_overlap: float = 0.25,
) -> list[NodeClass | None]:
    """The chaos class of each window, or None where no experiment touched that node
    (enough of the window; see `window_intervals`): the caller then uses the truth."""
    return [None if i is None else i.label for i in window_intervals(journal, windows, min_overlap)]
