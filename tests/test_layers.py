"""The import layers hold: import-linter's contracts in pyproject.toml, run on the package
as installed (scripts/imports.py), and every module placed in a layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_import_contract_is_kept_and_every_module_has_a_layer():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "imports.py"), "lint"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in run.stdout


def test_a_module_outside_every_layer_is_reported(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import imports
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    real = imports.config()

    def without_work() -> dict:
        tiers = next(c for c in real["tool"]["importlinter"]["contracts"] if c["id"] == "tiers")
        tiers["layers"] = [row.replace("twlb.work : ", "") for row in tiers["layers"]]
        return real

    monkeypatch.setattr(imports, "config", without_work)
    assert imports.unplaced_modules() == ["twlb.work"]
