"""A real headless Chromium for the console's browser tests (Debian's ``chromium`` and ``chromium-driver``).

Under CI (``CI`` set) a missing browser fails the test, since ``.ci/run`` installs it; on a developer's
machine it skips, saying which packages to install. ``screenshot`` saves the page shown to
``docs/console/<name>.png`` at 1280×800 (or the whole page) when ``HL7BRIDGE_SCREENSHOTS=1`` (the README shows
those files).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "console"
WIDTH, HEIGHT = 1280, 800
#: The tallest whole-page screenshot.
MAX_HEIGHT = 1600
#: The flags of the shared design: no sandboxing (root in CI), no GPU, and nothing that calls out to the network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    f"--window-size={WIDTH},{HEIGHT}",
)


def executables() -> tuple[str, str]:
    """The browser and its driver, or the test's skip (fail under CI) naming the packages."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = " and ".join(name for name, found in (("chromium", browser), ("chromium-driver", driver)) if not found)
    if os.environ.get("CI"):
        pytest.fail(f"{missing} missing under CI: .ci/run installs Debian's chromium and chromium-driver")
    pytest.skip(f"{missing} not installed (Debian/Ubuntu packages: chromium chromium-driver)")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[object]:
    """A headless Chromium WebDriver with a fresh profile (no cookies, cache or history from another test)."""
    browser, driver_path = executables()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    # The page itself is WIDTH×HEIGHT (a window's size includes its frame): the screenshots' size.
    _viewport(driver, HEIGHT)
    try:
        yield driver
    finally:
        driver.quit()


def _viewport(driver: object, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # type: ignore[attr-defined]
                           {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})  # fmt: skip


def screenshot(driver: object, name: str, *, whole_page: bool = False) -> Path | None:
    """Save what the browser shows as ``docs/console/<name>.png`` when ``HL7BRIDGE_SCREENSHOTS=1``;
    ``whole_page``: down to the page's end (at most ``MAX_HEIGHT``), for a page whose last part matters."""
    if os.environ.get("HL7BRIDGE_SCREENSHOTS") != "1":
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    height = HEIGHT
    if whole_page:
        page = int(driver.execute_script("return document.documentElement.scrollHeight"))  # type: ignore[attr-defined]
        height = min(max(page, HEIGHT), MAX_HEIGHT)
    _viewport(driver, height)
    try:
        driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    finally:
        _viewport(driver, HEIGHT)
    return path
