"""A real browser for tests: Debian's headless chromium, driven through chromedriver's
WebDriver HTTP API with ``requests`` (no browser-automation library to pin).

``browser(tmp_path)`` skips the test when chromium or chromedriver is not installed, unless
``BROWSER_TESTS=required`` (set by ``.ci/run``, which installs both), where it fails instead.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.processes import wait_for
from tests.redis_process import free_port

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # how W3C WebDriver names an element
WIDTH = 1400
# The page's height and what the window adds to it (run by chromedriver, not by the page).
PAGE_HEIGHT = "return [document.documentElement.scrollHeight, outerHeight - innerHeight]"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests may run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: the machine's network is closed
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={WIDTH},1000",
]


class BrowserError(AssertionError):
    """chromedriver refused a command (no such element, a page that did not load, ...)."""


class Browser:
    """One chromium session: open pages, read them, click, take screenshots."""

    def __init__(self, driver_url: str, session_id: str) -> None:
        self.base = f"{driver_url}/session/{session_id}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One WebDriver command; its ``value``, or BrowserError with chromedriver's reason."""
        answer = requests.request(method, self.base + path, json=body, timeout=60)
        value = answer.json()["value"]
        if answer.status_code != 200:
            raise BrowserError(f"{method} {path}: {value.get('error')}: {value.get('message')}")
        return value

    def cdp(self, command: str, **params: Any) -> Any:
        """A Chrome DevTools Protocol command, through chromedriver."""
        return self.call("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def send_header(self, name: str, value: str) -> None:
        """Send this header with every request from now on (a login, say)."""
        self.cdp("Network.enable")
        self.cdp("Network.setExtraHTTPHeaders", headers={name: value})

    def open(self, url: str) -> None:
        """Load a page (returns once it has loaded)."""
        self.call("POST", "/url", {"url": url})

    def title(self) -> str:
        return str(self.call("GET", "/title"))

    def url(self) -> str:
        return str(self.call("GET", "/url"))

    def find_all(self, css: str) -> list[str]:
        """The ids of the elements matching a CSS selector."""
        found = self.call("POST", "/elements", {"using": "css selector", "value": css})
        return [element[ELEMENT] for element in found]

    def find(self, css: str, wait: float = 10.0) -> str:
        """The id of the one element matching a CSS selector, waiting up to ``wait`` s for it
        (a click that submits a form may return before the next page is there)."""
        deadline = time.monotonic() + wait
        while True:
            found = self.find_all(css)
            if len(found) == 1:
                return found[0]
            if time.monotonic() > deadline:
                raise BrowserError(f"{len(found)} elements match {css!r}, expected one")
            time.sleep(0.1)

    def text(self, css: str = "body") -> str:
        """The text the element shows, as a reader sees it (rendered, unescaped)."""
        return str(self.call("GET", f"/element/{self.find(css)}/text"))

    def click(self, css: str, wait: float = 10.0) -> None:
        """Click the one element matching a CSS selector, then wait up to ``wait`` s for the
        page it loads (this page has no script: every link and button loads one)."""
        before = self.find("html")
        self.call("POST", f"/element/{self.find(css)}/click", {})
        deadline = time.monotonic() + wait
        while self.find_all("html") in ([], [before]) or not self._loaded():
            if time.monotonic() > deadline:
                raise BrowserError(f"clicking {css!r} loaded no new page within {wait} s")
            time.sleep(0.05)

    def _loaded(self) -> bool:
        script = {"script": "return document.readyState", "args": []}
        return self.call("POST", "/execute/sync", script) == "complete"

    def screenshot(self, path: Path) -> Path:
        """The whole page, as PNG, into ``path``: the window made as tall as the page, then
        WebDriver's own screenshot (DevTools' ``captureBeyondViewport`` hung now and then)."""
        page, chrome = self.call("POST", "/execute/sync", {"script": PAGE_HEIGHT, "args": []})
        self.call("POST", "/window/rect", {"width": WIDTH, "height": int(page + chrome) + 20})
        self.call("POST", "/execute/sync", {"script": "window.scrollTo(0, 0)", "args": []})
        path.write_bytes(base64.b64decode(self.call("GET", "/screenshot")))
        return path


def _installed() -> tuple[str, str]:
    """The chromium and chromedriver to use; skips (or fails where required) without them."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "chromium and chromedriver are not installed (Debian: apt-get install chromium "
    why += "chromium-driver); .ci/run installs them"
    if os.environ.get("BROWSER_TESTS") == "required":
        pytest.fail(why)
    pytest.skip(why)


@contextmanager
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless chromium session for the ``with`` block (chromedriver's log in tmp_path)."""
    chromium, driver = _installed()
    port = free_port()
    with (tmp_path / "chromedriver.log").open("wb") as log:
        process = subprocess.Popen(
            [driver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 30, "chromedriver to answer")
        options = {
            "binary": chromium,
            "args": [*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'profile'}"],
        }
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        answer = requests.post(f"{url}/session", json={"capabilities": capabilities}, timeout=120)
        value = answer.json()["value"]
        if answer.status_code != 200:
            raise BrowserError(f"chromium did not start: {value.get('message')}")
        session = Browser(url, value["sessionId"])
        try:
            yield session
        finally:
            requests.delete(session.base, timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return bool(requests.get(f"{url}/status", timeout=1).json()["value"]["ready"])
    except (requests.RequestException, ValueError, KeyError):
        return False
