"""The gallery in a real headless browser: Debian's chromium driven by selenium.

Used by the browser tests (``-m browser``) and by ``orchestration.gallery --screenshots``.
Chromium starts with a fresh profile and everything that would reach the network off
(``--disable-background-networking``, no component updates, no sync, no QUIC), so the only
requests a page makes are its own; the DevTools performance log records each of them, and
the console log every error, for the tests to assert on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
# Requests that leave the machine; chromium's own chrome:// pages (the first tab) do not.
NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")
VIEWS = ("curves", "eval", "prompts", "mix", "record")


def available() -> str | None:
    """None when chromium, its driver and selenium are all here, else what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing) or None


class Browser:
    """A headless chromium session (a context manager); :meth:`open` loads a page."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        self.size = (width, height)
        self.driver = None
        self.profile: str | None = None

    def __enter__(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download
        self.profile = tempfile.mkdtemp(prefix="gallery-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self.profile}",
                     f"--window-size={self.size[0]},{self.size[1]}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        return self

    def __exit__(self, *exc) -> None:
        if self.driver is not None:
            self.driver.quit()
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, index: Path) -> Page:
        return Page(self.driver, Path(index).resolve().as_uri())


class Page:
    def __init__(self, driver, url: str, timeout: float = 30) -> None:
        self.driver, self.url, self.timeout = driver, url, timeout
        self._console: list[dict] = []
        self._requests: list[str] = []
        driver.get(url)
        self.wait_for("return document.body && document.body.dataset.ready === '1'")

    def wait_for(self, script: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.driver.execute_script(script):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: timed out waiting for: {script}")
            time.sleep(0.05)

    def _drain(self) -> None:
        import json

        self._console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self._requests.append(message["params"]["request"]["url"])

    def errors(self) -> list[str]:
        """Console messages at SEVERE level (uncaught exceptions, failed loads) so far."""
        self._drain()
        return [m["message"] for m in self._console if m.get("level") == "SEVERE"]

    def requests(self) -> list[str]:
        self._drain()
        return list(self._requests)

    def external_requests(self) -> list[str]:
        return [u for u in self.requests() if u.lower().startswith(NETWORK_SCHEMES)]

    def show(self, view: str) -> None:
        """Switch to ``view`` and wait until each of its plots has been drawn."""
        self.driver.execute_script("location.hash = arguments[0]", view)
        self.wait_for(f"return document.body.dataset.view === '{view}'")
        self.wait_for(f"return [...document.querySelectorAll('#view-{view} .plot')]"
                      ".every(n => n.classList.contains('js-plotly-plot'))")
        time.sleep(0.3)  # plotly's transitions

    def select(self, element_id: str, value: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(self.driver.find_element(By.ID, element_id)).select_by_value(str(value))

    def text(self, css: str) -> list[str]:
        from selenium.webdriver.common.by import By

        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def screenshot(self, path: Path) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return Path(path)

    def screenshot_views(self, out_dir: Path) -> list[Path]:
        shots = []
        for view in VIEWS:
            self.show(view)
            self.driver.execute_script("window.scrollTo(0, 0)")
            shots.append(self.screenshot(Path(out_dir) / f"{view}.png"))
        return shots
