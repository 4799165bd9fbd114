"""`twlb sim check --html FILE` in a real headless browser (Debian's chromium through
Playwright): the page loads from the file alone, draws every operation of the history
per client, and for a history that is not linearizable shows the longest linearizable
prefix and the one operation that cannot be placed, in view; for a linearizable one, a
linearization whose points lie inside their operations' bars, in real-time order.

Chromium missing is a failure, not a skip: `.ci/run` installs `chromium`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from playwright.sync_api import sync_playwright
from twlb.dashboard.screenshot import CHROMIUM, launch
from twlb.sim.checker import check_history
from twlb.sim.cli import command
from twlb.sim.history import read_history

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "jepsen"
ARTIFACTS = REPO / "reports" / "test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), (
        f"{CHROMIUM} missing: apt-get install chromium (scripts/system-deps)"
    )
    with sync_playwright() as pw:
        context = launch(pw, tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def opened(browser, path: Path) -> Iterator[Any]:
    """The page from its file; on leaving, no console error and no request for anything
    but the file itself (the page is self-contained)."""
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(path.as_uri())
        page.wait_for_selector("#verdict")
        yield page
        assert errors == []
        assert requests == [path.as_uri()], requests
    finally:
        page.close()


def write_page(tmp_path: Path, history: Path, model: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / f"{history.stem}.html"
    result = CliRunner().invoke(
        command, ["check", str(history), "--model", model, "--html", str(out), *extra]
    )
    assert out.exists(), result.output
    return result.exit_code, out


def test_a_failing_history_shows_its_longest_prefix_and_the_operation_that_cannot_be_placed(
    browser, tmp_path
):
    history = DATA / "jepsen-etcd" / "etcd_000.log"
    code, path = write_page(tmp_path, history, "register")
    assert code == 1
    verdict = check_history(read_history(history), "register")
    ops = verdict.failing_operations
    with opened(browser, path) as page:
        assert page.locator("#verdict").inner_text() == "not linearizable"
        assert page.locator("g.op").count() == len(ops) == 85
        # one row per client process that ran an operation
        assert page.locator("text.process").count() == len({op.process for op in ops})
        stuck = page.locator("g.op.stuck")
        assert stuck.count() == 1
        assert stuck.get_attribute("data-op") == str(verdict.stuck)
        assert "read() \u2192 2" in stuck.locator("text").text_content()
        assert "process 11" in stuck.locator("title").text_content()
        # the longest linearizable prefix: drawn green, numbered, and listed with states
        assert page.locator("g.op.placed").count() == len(verdict.longest) == 41
        assert page.locator("g.point").count() == 41
        assert page.locator("table.prefix tr.step").count() == 41
        row = page.locator("table.prefix tr.stuck").inner_text()
        assert "cannot be placed" in row and "read() \u2192 2" in row
        # the page scrolls the timeline so that the failing completion is in view
        box = page.locator("details.key .scroll").first.bounding_box()
        frontier = page.locator("line.frontier").bounding_box()
        assert box["x"] <= frontier["x"] <= box["x"] + box["width"]
        stuck.scroll_into_view_if_needed()
        assert stuck.is_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "sim-check-page-etcd_000.png"))


def test_a_linearizable_history_shows_a_linearization_in_real_time_order(browser, tmp_path):
    history = DATA / "jepsen-etcd" / "etcd_002.log"
    code, path = write_page(tmp_path, history, "register")
    assert code == 0
    with opened(browser, path) as page:
        assert page.locator("#verdict").inner_text() == "linearizable"
        n = page.locator("g.op").count()
        assert n == 77 and page.locator("g.op.stuck").count() == 0
        points = page.locator("g.point")
        assert points.count() == n
        # Each point lies inside its operation's bar, and the points go left to right
        # in the order of the linearization: what a linearization is, drawn.
        last = -1.0
        for k in range(n):
            point = points.nth(k)
            assert point.get_attribute("data-step") == str(k + 1)
            c = point.locator("circle").bounding_box()
            x = c["x"] + c["width"] / 2
            bar = page.locator(f'g.op[data-op="{point.get_attribute("data-op")}"] rect')
            b = bar.bounding_box()
            assert b["x"] - 0.5 <= x <= b["x"] + b["width"] + 0.5
            assert x >= last - 0.01
            last = x


def test_an_undecided_check_still_draws_the_history_and_how_far_it_got(browser, tmp_path):
    history = DATA / "jepsen-etcd" / "etcd_002.log"
    code, path = write_page(tmp_path, history, "register", "--max-states", "500")
    assert code == 3
    with opened(browser, path) as page:
        assert page.locator("#verdict").inner_text() == "undecided"
        assert "configurations explored" in page.locator("pre.progress").inner_text()
        assert page.locator("g.op").count() == 77
        assert page.locator("g.point").count() == 0


def test_keys_of_a_kv_history_are_drawn_apart_failing_key_first(browser, tmp_path):
    history = DATA / "kv" / "c10-bad.txt"
    code, path = write_page(tmp_path, history, "kv")
    assert code == 1
    verdict = check_history(read_history(history), "kv")
    with opened(browser, path) as page:
        keys = page.locator("details.key")
        assert keys.count() == len(verdict.keys)
        assert keys.first.get_attribute("data-key") == verdict.failing_key
        assert keys.first.get_attribute("open") is not None
        assert keys.first.locator("g.op.stuck").count() == 1
        assert page.locator("g.op.stuck").count() == 1
