"""The oracle's ground truth file: `{backend_url: node_class}` for the `oracle` policy.

Experiments only: the oracle policy is told which backends are faulty, as the ceiling the
other policies are measured against.
"""

from __future__ import annotations

import json
from pathlib import Path

from twlb.balancer.upstream import BackendURLError, normalize_backend_url

from twlb.spec import NodeClass


class OracleTruthError(ValueError):
    """An oracle truth file that cannot be used; the message names the file and the problem."""


def load_oracle_truth(path: Path) -> dict[str, str]:
    """Read `{backend_url: node_class}` from a JSON file, URLs normalized, classes checked."""
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise OracleTruthError(f"{path}: cannot read: {err.strerror}") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise OracleTruthError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise OracleTruthError(f"{path}: must be a JSON object {{backend_url: node_class}}")
    classes = {c.value for c in NodeClass}
    truth: dict[str, str] = {}
    for url, cls in raw.items():
        try:
            norm = normalize_backend_url(url)
        except BackendURLError as err:
            raise OracleTruthError(f"{path}: {err}") from None
        if cls not in classes:
            raise OracleTruthError(
                f"{path}: {url}: unknown class {cls!r} (one of {sorted(classes)})"
            )
        truth[norm] = cls
    return truth
