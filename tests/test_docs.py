"""The documentation holds together: every relative link and anchor in README.md,
CONTRIBUTING.md, CHANGELOG.md and docs/*.md resolves, the README stays a front door of
at most 300 lines, the `TrustCluster` examples the docs show are valid, the quick
start's cluster is what the README says it is, and no file cites a text that is not in
the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from twlb.spec import FaultType, PolicyName, assign_faults, load_trustcluster, parse_trustcluster

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at whitespace or the closing paren
# (an optional "title" may follow).
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
    return docs + sorted((ROOT / "docs").glob("*.md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, everything but
    letters, digits, '_', '-' and spaces dropped, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = "".join(c for c in text.lower() if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code blocks and inline code."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            out.append((number, target))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(path):
        if SCHEME.match(target):
            continue  # http:, https:, mailto:: not relative
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, fragment = target.partition("#")
        file_part = file_part.split("?", 1)[0]
        resolved = (path.parent / file_part).resolve() if file_part else path
        if file_part and not resolved.exists():
            problems.append(f"{where} (no such file)")
            continue
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{where} (no heading or anchor #{fragment})")
    return problems


def test_the_readme_fits_on_a_screen_or_two():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == []


def test_the_link_checker_finds_a_missing_file_a_missing_anchor_and_a_way_out(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "DESIGN.md").write_text("# Design\n\n## Layers\n", encoding="utf-8")
    (tmp_path / "beside.md").write_text("# Outside\n", encoding="utf-8")
    doc = root / "docs" / "probe.md"
    doc.write_text(
        "# A `title`, with — punctuation\n\n## Again\n\n## Again\n\n"
        "[fine](#a-title-with--punctuation) [second](#again-1) [design](DESIGN.md#layers)\n"
        "[gone](no-such-file.md) [no anchor](DESIGN.md#no-such-heading)\n"
        "[out](../../beside.md) [here](#nowhere)\n"
        "`[in code](nowhere.md)` [web](https://example.org/x) ![img](DESIGN.md)\n\n"
        "```\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(doc, root)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "no-such-file.md (no such file)",
        "DESIGN.md#no-such-heading (no heading or anchor #no-such-heading)",
        "../../beside.md (outside the repository)",
        "#nowhere (no heading or anchor #nowhere)",
    ]


def trustcluster_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() in ("```yaml", "```yml"):
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return [b for b in blocks if re.search(r"^kind:\s*TrustCluster\b", b, re.MULTILINE)]


def test_the_trustcluster_examples_in_the_docs_are_valid():
    examples = [(p, b) for p in documents() for b in trustcluster_blocks(p)]
    assert examples, "the configuration page shows a TrustCluster"
    for path, block in examples:
        cluster = parse_trustcluster(yaml.safe_load(block))
        assert assign_faults(cluster.spec, cluster.metadata.name), path


def test_the_quick_start_cluster_has_one_liar_among_five_behind_trust():
    cluster = load_trustcluster(ROOT / "k8s" / "samples" / "liar.yaml")
    nodes = assign_faults(cluster.spec, cluster.metadata.name)
    liars = [n for n in nodes if n.fault.type is not FaultType.BENIGN]
    assert cluster.spec.policy is PolicyName.TRUST
    assert len(nodes) == 5
    assert [(n.index, n.fault.type, n.fault.probability) for n in liars] == [
        (2, FaultType.BYZANTINE, 1.0)
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "twlb up -f k8s/samples/liar.yaml --port-base 8000" in readme
    assert "http://127.0.0.1:8004 ejected proven" in readme  # node 2 at --port-base + 2 + 2


# What cites a text outside the repository: a numbered issue, a course and its projects,
# a seed of an outside data set, or a folder beside the checkout.
OUTSIDE_CITATIONS = re.compile(
    r"\bissues?\s+#?\d+|\bthe\s+course\b|\bcourse\s+projects?\b|\bseed\s+003\b|\.\./shared\b",
    re.IGNORECASE,
)
SKIP_DIRS = {
    ".git", ".venv", "build", "reports", "node_modules", "__pycache__", ".pytest_cache",
    ".ruff_cache", ".hypothesis",
}  # fmt: skip


def repository_files() -> list[Path]:
    """Every file of the checkout but version control, environments, builds and runs."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [
            d for d in dirs
            if d not in SKIP_DIRS and not d.startswith(".twlb") and not d.endswith(".egg-info")
        ]  # fmt: skip
        files.extend(Path(folder) / name for name in names)
    return files


def test_no_file_cites_a_text_outside_the_repository():
    found = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary: images, models, Parquet
        for number, line in enumerate(text.splitlines(), 1):
            match = OUTSIDE_CITATIONS.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert found == []


def test_the_citation_pattern_catches_what_it_is_for():
    # Joined here, so that this file does not cite what it looks for.
    cites = [
        "as issue" + " 12 asks", "Issues" + " 12 and 13", "issue" + " #7", "the" + " course",
        "course" + " projects'", "seed" + " 003", ".." + "/shared/conformance",
    ]  # fmt: skip
    fine = ["an issue with the seed", "of course", "seed 3", "shared/", "the courses"]
    assert all(OUTSIDE_CITATIONS.search(c) for c in cites)
    assert not any(OUTSIDE_CITATIONS.search(f) for f in fine)
