"""The labelled dataset: one row per backend per feature window, stored as Parquet.

Columns: run_id, seed, node, time (window end, seconds since the run started), one
float column per FEATURE_NAMES entry in order, label (the node's true NodeClass at that
moment) and fault (the fault type that produced it). The collector writes it, the
trainer and the benchmarks read it; the file's SHA-256 is the training-data digest a
model carries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twlb.spec import NodeClass

#: The data the shipped model is trained on (`make train` collects both): six-node
#: clusters at 120-260 req/s, and clusters of 3 to 6 nodes at 30-260 req/s.
SHIPPED_DATA = (
    Path(__file__).resolve().parent / "data" / "train.parquet",
    Path(__file__).resolve().parent / "data" / "train-small.parquet",
)

ID_COLUMNS = ("run_id", "seed", "node", "time")
LABEL_COLUMN = "label"
FAULT_COLUMN = "fault"


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class WindowRow:
    """One backend's feature window, labelled with its true class."""

    run_id: str
    seed: int
    node: str
    time: float
    features: tuple[float, ...]
    label: str
    fault: str

    def key(self) -> tuple[str, str, float]:
        return (self.run_id, self.node, self.time)


def schema(feature_names: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("run_id", pa.string()),
            pa.field("seed", pa.int64()),
            pa.field("node", pa.string()),
            pa.field("time", pa.float64()),
            *(pa.field(name, pa.float64()) for name in feature_names),
            pa.field(LABEL_COLUMN, pa.string()),
            pa.field(FAULT_COLUMN, pa.string()),
        ]
    )


def rows_to_table(
    rows: Iterable[WindowRow],
    feature_names: Sequence[str],
    metadata: Mapping[str, str] | None = None,
) -> pa.Table:
    rows = sorted(rows, key=WindowRow.key)
    columns: dict[str, list[Any]] = {
        "run_id": [r.run_id for r in rows],
        "seed": [r.seed for r in rows],
        "node": [r.node for r in rows],
        "time": [r.time for r in rows],
    }
    for i, name in enumerate(feature_names):
        columns[name] = [float(r.features[i]) for r in rows]
    columns[LABEL_COLUMN] = [r.label for r in rows]
    columns[FAULT_COLUMN] = [r.fault for r in rows]
    table = pa.table(columns, schema=schema(feature_names))
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    return table


def write_rows(
    path: str | Path,
    rows: Iterable[WindowRow],
    feature_names: Sequence[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(rows, feature_names, metadata), p, compression="zstd")
    return p


def file_digest(path: str | Path) -> str:
    """SHA-256 of a dataset file's bytes: the training-data digest a model carries."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset as arrays, checked against the feature names in force."""

    path: Path
    digest: str
    run_id: np.ndarray
    seed: np.ndarray
    node: np.ndarray
    time: np.ndarray
    X: np.ndarray
    y: np.ndarray
    fault: np.ndarray
    feature_names: tuple[str, ...]
    metadata: Mapping[str, str]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: np.ndarray) -> Dataset:
        """The rows where boolean `keep` is true; file, digest and metadata unchanged."""
        return replace(
            self,
            **{
                f: getattr(self, f)[keep]
                for f in ("run_id", "seed", "node", "time", "X", "y", "fault")
            },
        )

    def rows(self) -> list[WindowRow]:
        return [
            WindowRow(
                str(self.run_id[i]),
                int(self.seed[i]),
                str(self.node[i]),
                float(self.time[i]),
                tuple(float(v) for v in self.X[i]),
                str(self.y[i]),
                str(self.fault[i]),
            )
            for i in range(len(self))
        ]


def read_dataset(path: str | Path, feature_names: Sequence[str]) -> Dataset:
    """Read a dataset file; raise DatasetError naming what is missing or wrong."""
    p = Path(path)
    try:
        table = pq.read_table(p)
    except FileNotFoundError:
        raise DatasetError(f"{p}: no such file") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise DatasetError(f"{p}: not a readable Parquet file: {err}") from None
    needed = [*ID_COLUMNS, *feature_names, LABEL_COLUMN, FAULT_COLUMN]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DatasetError(f"{p}: lacks columns {missing}")
    if table.num_rows == 0:
        raise DatasetError(f"{p}: holds no rows")
    labels = np.asarray(table.column(LABEL_COLUMN).to_pylist(), dtype=object)
    known = {c.value for c in NodeClass}
    unknown = sorted({str(v) for v in labels} - known)
    if unknown:
        raise DatasetError(f"{p}: unknown labels {unknown} (known: {sorted(known)})")
    X = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in feature_names])
    if not np.all(np.isfinite(X)):
        raise DatasetError(f"{p}: holds non-finite feature values")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return Dataset(
        path=p,
        digest=file_digest(p),
        run_id=np.asarray(table.column("run_id").to_pylist(), dtype=object),
        seed=table.column("seed").to_numpy(),
        node=np.asarray(table.column("node").to_pylist(), dtype=object),
        time=table.column("time").to_numpy(),
        X=X.astype(np.float64),
        y=labels,
        fault=np.asarray(table.column(FAULT_COLUMN).to_pylist(), dtype=object),
        feature_names=tuple(feature_names),
        metadata=meta,
    )


def read_datasets(paths: Sequence[str | Path], feature_names: Sequence[str]) -> Dataset:
    """Several dataset files as one; the digest of more than one covers each file's in order."""
    parts = [read_dataset(p, feature_names) for p in paths]
    if not parts:
        raise DatasetError("no dataset files given")
    if len(parts) == 1:
        return parts[0]
    seeds: dict[int, str] = {}
    for part in parts:
        for s in {int(v) for v in part.seed}:
            if seeds.setdefault(s, str(part.path)) != str(part.path):
                raise DatasetError(
                    f"seed {s} appears in both {seeds[s]} and {part.path}: runs must not share seeds"
                )
    joined = hashlib.sha256("".join(p.digest for p in parts).encode()).hexdigest()
    return Dataset(
        path=Path(" + ".join(str(p.path) for p in parts)),
        digest=joined,
        run_id=np.concatenate([p.run_id for p in parts]),
        seed=np.concatenate([p.seed for p in parts]),
        node=np.concatenate([p.node for p in parts]),
        time=np.concatenate([p.time for p in parts]),
        X=np.vstack([p.X for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        fault=np.concatenate([p.fault for p in parts]),
        feature_names=tuple(feature_names),
        metadata={
            "source": ", ".join(p.metadata.get("source", "?") for p in parts),
            "window_s": parts[0].metadata.get("window_s", "?"),
            "description": " + ".join(p.metadata.get("description", "") for p in parts),
        },
    )


@dataclass
class Sample:
    """One sample instant: the direct reading, labelled per backend URL later."""

    at: float
    direct: dict[str, dict[str, float]]
    tick_seen_at: float = 0.0  # when the balancer's trust tick being read was first seen
