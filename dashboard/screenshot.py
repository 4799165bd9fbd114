"""A picture of the live page: Debian's chromium, headless, driven by Playwright.

One launch recipe for `twlb demo` (which leaves a screenshot in its report) and the
browser test: no network beyond loopback, no first-run, sync or component update, and a
fresh profile directory each time.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

#: Debian's chromium (`apt-get install chromium`), not a browser Playwright downloads.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 1100}


def launch(playwright: Any, profile_dir: Path) -> Any:
    """A headless chromium context on a fresh profile (`--user-data-dir`)."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=CHROMIUM, args=CHROMIUM_ARGS, viewport=VIEWPORT
    )


def screenshot(url: str, path: Path, nodes: int, timeout_s: float = 20.0) -> Path:
    """Open the dashboard at `url`, wait until its stream is live and `nodes` cards are
    drawn, and save a full-page PNG at `path`."""
    from playwright.sync_api import sync_playwright

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twlb-chromium-") as profile, sync_playwright() as pw:
        browser = launch(pw, Path(profile))
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#link.link-live", timeout=timeout_s * 1000)
            page.wait_for_function(
                f"document.querySelectorAll('.card').length >= {int(nodes)}",
                timeout=timeout_s * 1000,
            )
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    return path


class DelayedScreenshot:
    """A screenshot taken on a thread after a delay, so that it shows a cluster under load
    (`twlb demo` starts one as its last phase begins). A missing chromium or a page that
    does not come up is a reason in `problem`, not an exception: the caller's reports
    stand without the picture."""

    def __init__(self, url: str, path: Path, nodes: int) -> None:
        self.url, self.path, self.nodes = url, path, nodes
        self.taken: Path | None = None
        self.problem: str | None = None
        self._timer: threading.Timer | None = None

    def start_after(self, delay_s: float) -> None:
        self._timer = threading.Timer(delay_s, self._take)
        self._timer.daemon = True
        self._timer.start()

    def _take(self) -> None:
        from playwright.sync_api import Error as BrowserError

        if not Path(CHROMIUM).exists():
            self.problem = f"{CHROMIUM} is not installed"
            return
        try:
            self.taken = screenshot(self.url, self.path, self.nodes)
        except BrowserError as err:
            self.problem = str(err).splitlines()[0]

    def wait(self, timeout_s: float = 60.0) -> Path | None:
        """The screenshot's path once taken (None, with `problem` set, when it was not)."""
        if self._timer is None:
            self.problem = self.problem or "never started"
            return None
        self._timer.join(timeout_s)
        if self._timer.is_alive():
            self.problem = f"not taken within {timeout_s:g}s"
        return self.taken
