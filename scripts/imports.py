#!/usr/bin/env python3
"""The import layers of the `twlb` distribution: checked, and drawn.

    python scripts/imports.py lint            # import-linter's contracts (pyproject.toml)
    python scripts/imports.py draw OUT.svg    # the package graph, drawn by graphviz

pyproject.toml maps top-level folders onto `twlb.*` names (`package-dir`: `services/
balancer/` is `twlb.balancer`). grimp, which import-linter uses, finds a package's
modules by walking one directory, so it would see only `twlb/`. This script builds the
package as it is installed, a tree of symlinks to the real files under
build/import-tree/, and points both tools at it. `lint` also fails when a module of the
package is in no row of the `tiers` contract, so a new module has to be placed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "import-tree"


def config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def build_tree() -> Path:
    """build/import-tree/twlb/...: every package of package-dir, its .py files linked."""
    shutil.rmtree(TREE, ignore_errors=True)
    for package, folder in config()["tool"]["setuptools"]["package-dir"].items():
        target = TREE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / folder).glob("*.py")):
            (target / source.name).symlink_to(source)
    return TREE


def _graph():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(build_tree()))
    import grimp

    return grimp.build_graph("twlb", cache_dir=None)


def unplaced_modules() -> list[str]:
    """Modules of twlb that no row of the `tiers` contract names (or contains)."""
    contracts = config()["tool"]["importlinter"]["contracts"]
    tiers = next(c for c in contracts if c.get("id") == "tiers")
    placed = {
        name.strip()
        for row in tiers["layers"]
        for name in row.replace("|", ":").split(":")
        if name.strip()
    }
    graph = _graph()
    return sorted(
        m
        for m in graph.modules
        if m != "twlb"
        and not graph.is_module_squashed(m)
        and m.startswith("twlb.")
        and not any(m == p or m.startswith(p + ".") for p in placed)
        and not any(p.startswith(m + ".") for p in placed)  # a package whose modules are placed
    )


def lint() -> int:
    tree = build_tree()
    env = dict(os.environ, PYTHONPATH=str(tree))
    lint_imports = Path(sys.executable).with_name("lint-imports")
    rc = subprocess.call(
        [str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
    )
    missing = unplaced_modules()
    if missing:
        print(
            "scripts/imports.py: these modules are in no row of the 'tiers' contract "
            "(pyproject.toml); place each in its layer: " + ", ".join(missing),
            file=sys.stderr,
        )
        return 1
    return rc


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["orchestration"] and len(parts) > 2:
        return module  # the orchestration layers are modules: show them one by one
    return ".".join(parts[:2])


def draw(out: Path) -> int:
    """The graph of twlb's packages (orchestration by module) as SVG, through `dot`."""
    dot = shutil.which("dot")
    if dot is None:
        print("scripts/imports.py: graphviz's `dot` is not installed", file=sys.stderr)
        return 2
    graph = _graph()
    edges: dict[tuple[str, str], int] = defaultdict(int)
    nodes = set()
    for importer in graph.modules:
        if not importer.startswith("twlb.") or graph.is_module_squashed(importer):
            continue
        nodes.add(package_of(importer))
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported.startswith("twlb.") and not graph.is_module_squashed(imported):
                a, b = package_of(importer), package_of(imported)
                if a != b:
                    edges[a, b] += 1
    lines = [
        "digraph twlb {",
        '  rankdir=TB; node [shape=box, fontname="Helvetica", fontsize=11];',
        '  edge [color="#555555", arrowsize=0.6];',
    ]
    linked = {n for edge in edges for n in edge}
    lines += [f'  "{n}";' for n in sorted(nodes & linked)]
    lines += [
        f'  "{a}" -> "{b}" [penwidth={min(1 + n / 4, 4):.1f}];'
        for (a, b), n in sorted(edges.items())
    ]
    lines.append("}")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [dot, f"-T{out.suffix.lstrip('.') or 'svg'}", "-o", str(out)],
        input="\n".join(lines),
        text=True,
        check=True,
    )
    print(f"wrote {out}: {len(nodes)} packages, {len(edges)} arrows")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["lint"]:
        return lint()
    if argv[:1] == ["draw"] and len(argv) == 2:
        return draw(Path(argv[1]))
    print(__doc__.strip().splitlines()[2:4], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
