"""Hot reload of the balancer's ONNX trust model: watch the file, swap it in, or keep the old.

The balancer calls `ModelReloader.poll()` from its trust tick. A changed file (mtime,
size or inode: an atomic rename counts) is loaded and checked by `OnnxScorer.load`; a
good one is handed to `on_load` (which swaps the trust engine's scorer), a corrupt or
mismatched one is logged, counted in `twlb_balancer_model_load_failures_total` and the
previous model stays. A refused file is not retried until it changes again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from twlb.balancer.onnx_scorer import ModelRefused, OnnxScorer

log = logging.getLogger("twlb.balancer.model")

FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    """(mtime_ns, size, inode) of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ModelReloader:
    """Watches one model file for the balancer; the scorer in force is `scorer`."""

    def __init__(
        self,
        path: str | Path,
        on_load: Callable[[OnnxScorer], None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.path = Path(path)
        self.on_load = on_load
        self.failures = Counter(
            "twlb_balancer_model_load_failures",
            "Model files refused (corrupt, unreadable or not matching the features).",
            registry=registry,
        )
        self.loads = Counter(
            "twlb_balancer_model_loads",
            "Model files loaded and put in force (the first one included).",
            registry=registry,
        )
        self.info = Gauge(
            "twlb_balancer_model_info",
            "The trust model in force (value 1), by name, version and training-data digest.",
            ["name", "version", "digest"],
            registry=registry,
        )
        self.scorer: OnnxScorer | None = None
        self._seen: FileSignature = None

    def load_initial(self) -> OnnxScorer:
        """Load the file at start-up; ModelRefused propagates (the balancer must not start)."""
        self._seen = file_signature(self.path)
        scorer = OnnxScorer.load(self.path)
        self._use(scorer)
        return scorer

    def poll(self) -> bool:
        """Reload if the file changed since the last attempt; True when a new model is in."""
        sig = file_signature(self.path)
        if sig == self._seen:
            return False
        self._seen = sig
        if sig is None:
            self._refuse(f"{self.path}: the model file is gone")
            return False
        try:
            scorer = OnnxScorer.load(self.path)
        except ModelRefused as err:
            self._refuse(str(err))
            return False
        self._use(scorer)
        return True

    def _use(self, scorer: OnnxScorer) -> None:
        previous = self.scorer
        self.on_load(scorer)
        self.scorer = scorer
        self.loads.inc()
        if previous is not None:
            i = previous.info
            self.info.remove(i.name, i.version, i.training_data_digest)
        i = scorer.info
        self.info.labels(i.name, i.version, i.training_data_digest).set(1)
        log.info(
            "trust model in force: %s %s (data %s) from %s",
            i.name,
            i.version,
            i.training_data_digest[:12],
            self.path,
        )

    def _refuse(self, reason: str) -> None:
        self.failures.inc()
        kept = self.scorer.info.version if self.scorer else "none"
        log.error("trust model refused, keeping version %s: %s", kept, reason)
