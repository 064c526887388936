"""A real headless Chromium for the dashboard tests: Debian's `chromium` driven through
`chromedriver` (selenium), a clean profile in a temp dir, downloads into a folder of its
own, screenshots kept under <repo>/test-artifacts/dashboard/ (gitignored)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.support.harness import ROOT, wait_until

ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
LAPTOP = (1366, 768)
PHONE = (390, 844)


def _binary(name: str, *candidates: str) -> str:
    for candidate in (shutil.which(name), *candidates):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError(f"{name} not found (scripts/setup.sh installs Debian's chromium "
                            "and chromium-driver)")


class Browser:
    """One headless Chromium; `by_id`, `wait_text`, `shot` for the tests."""

    def __init__(self, size: tuple[int, int] = LAPTOP) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tf-chromium-"))
        self.downloads = self.workdir / "downloads"
        self.downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = _binary("chromium", "/usr/bin/chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--disable-background-networking",
                    "--disable-sync", "--disable-component-update",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--user-data-dir={self.workdir / 'profile'}",
                    f"--window-size={size[0]},{size[1]}"):
            options.add_argument(arg)
        options.add_experimental_option("prefs", {
            "download.default_directory": str(self.downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        })
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(executable_path=_binary("chromedriver", "/usr/bin/chromedriver"),
                          log_output=str(self.workdir / "chromedriver.log"))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.execute_cdp_cmd("Browser.setDownloadBehavior", {
            "behavior": "allow", "downloadPath": str(self.downloads)})
        self.resize(*size)

    # ------------------------------------------------------------------------ basics
    def resize(self, width: int, height: int) -> None:
        """The viewport (the page's own size, as a phone's or laptop's screen)."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1,
            "mobile": width < 600})

    def open(self, url: str) -> None:
        self.driver.get(url)
        wait_until(lambda: self.js("return document.body && document.body.dataset.ready"),
                   what=f"the dashboard script at {url}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def css(self, selector: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def attr(self, selector: str, name: str) -> str | None:
        """An attribute of the first element matching `selector` (None: no such element);
        read in the page, so a re-render between find and read cannot go stale."""
        return self.js("const e = document.querySelector(arguments[0]);"
                       "return e ? e.getAttribute(arguments[1]) : null;", selector, name)

    def text(self, selector: str) -> str | None:
        return self.js("const e = document.querySelector(arguments[0]);"
                       "return e ? e.textContent.trim() : null;", selector)

    def visible(self, element_id: str) -> bool:
        return bool(self.js("const e = document.getElementById(arguments[0]);"
                            "return !!e && e.getClientRects().length > 0;", element_id))

    def type_into(self, element_id: str, text: str) -> None:
        field = self.by_id(element_id)
        field.clear()
        field.send_keys(text)

    def click(self, selector: str) -> None:
        """Click the first element matching `selector`, again if a refresh re-rendered it
        between the find and the click."""
        def attempt() -> bool:
            try:
                found = self.css(selector)
                if not found:
                    return False
                found[0].click()
                return True
            except StaleElementReferenceException:
                return False
        wait_until(attempt, timeout=10, what=f"a clickable {selector}")

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
        wait_until(check, timeout=timeout, what=what)

    # ------------------------------------------------------------------- artefacts
    def shot(self, name: str) -> Path:
        """A screenshot of the viewport, kept as a test artefact."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def full_shot(self, name: str) -> Path:
        """The whole page (not only the viewport), through the devtools protocol."""
        import base64

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        # A sticky bar would be drawn where the viewport ends: pin it for the capture.
        pinned = self.js("const out = [];"
                         "for (const e of document.querySelectorAll('body *')) {"
                         "  const p = getComputedStyle(e).position;"
                         "  if (p === 'sticky' || p === 'fixed') {"
                         "    out.push(e); e.dataset.shotPosition = e.style.position;"
                         "    e.style.position = 'static'; } }"
                         "return out;")
        try:
            data = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True})["data"]
        finally:
            self.js("for (const e of arguments[0]) e.style.position = e.dataset.shotPosition;",
                    pinned)
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        try:
            return [entry["message"] for entry in self.driver.get_log("browser")
                    if entry.get("level") == "SEVERE"]
        except WebDriverException:
            return []

    def downloaded(self, name: str, timeout: float = 20.0) -> bytes:
        """The bytes of a finished download called `name`."""
        path = self.downloads / name
        # Chromium writes into a .crdownload file and renames it once it is complete.
        wait_until(lambda: path.exists() and not list(self.downloads.glob("*.crdownload")),
                   timeout=timeout, what=f"download {name}")
        return path.read_bytes()

    def clear_downloads(self) -> None:
        """Empty the download folder (a second file of the same name would get " (1)")."""
        for path in self.downloads.iterdir():
            path.unlink()

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
