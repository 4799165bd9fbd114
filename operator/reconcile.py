"""Level-based reconciliation plan: desired objects vs live objects -> creates, patches, deletes.

Pure: the handlers list what exists, render what should exist, and apply the plan this
module returns. A second run against the result is an empty plan, which is what makes
the operator idempotent, and an object whose desired fields already hold is never
patched, which is why changing one node's fault touches only that node's Deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twlb.operator.render import COMPONENT_MODEL, COMPONENT_TOKENS, LABEL_COMPONENT

Key = tuple[str, str]  # (kind, name)


def key_of(obj: Mapping[str, Any]) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def holds(desired: Any, live: Any) -> bool:
    """True when every field set in `desired` has that value in `live`.

    Fields the API server fills in (defaults, uids, status) are ignored; lists must have
    the same length and hold element by element.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and holds(v, live[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(holds(d, v) for d, v in zip(desired, live, strict=True))
    return desired == live


def _owned_content(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of an object the operator keeps in line after creating it.

    Token Secrets are generated once and the model ConfigMap is filled by whoever trains
    a model: for those only the metadata is ours (other Secrets, such as Envoy's
    bootstrap, are rendered from the spec and kept in line).
    """
    labels = obj["metadata"].get("labels", {})
    if labels.get(LABEL_COMPONENT) in (COMPONENT_TOKENS, COMPONENT_MODEL):
        meta = obj["metadata"]
        return {"metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}}
    return obj


@dataclass
class Plan:
    """What to do to make the live objects match the desired ones."""

    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[tuple[Key, dict[str, Any]]] = field(default_factory=list)
    delete: list[Key] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.patch or self.delete)

    def summary(self) -> str:
        return f"created {len(self.create)}, updated {len(self.patch)}, deleted {len(self.delete)}"


def plan(desired: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]]) -> Plan:
    """The changes that turn `live` (objects the cluster owns now) into `desired`."""
    live_by_key = {key_of(o): o for o in live}
    out = Plan()
    wanted: set[Key] = set()
    for obj in desired:
        key = key_of(obj)
        wanted.add(key)
        current = live_by_key.get(key)
        if current is None:
            out.create.append(dict(obj))
            continue
        content = _owned_content(obj)
        if not holds(content, current):
            out.patch.append((key, dict(content)))
    out.delete = sorted(k for k in live_by_key if k not in wanted)
    return out
