"""report.html in a real browser: Debian's headless Chromium, driven by selenium through chromium-driver.

``assert_renders(path)`` is the check any report can be put through (the demo's too): it opens the file at a
laptop's 1366×768, waits for it to load, and checks that the screenshot is not blank, that every image decoded,
that the browser logged no error (a blocked external load, a broken image, bad CSS all log one) and that nothing
overflows the window sideways. Without chromium, chromedriver or selenium the tests skip, except under CI (the
``CI`` environment variable set), where they fail: ``.ci/run`` installs the browser, so CI must run them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread, imsave

from gatelens.report.html import write_report
from tests.test_report_html import sample_report

LAPTOP = (1366, 768)
PHONE = (400, 860)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _browser_or_skip() -> tuple[str, str]:
    """chromium's and chromedriver's paths; skips without them (or without selenium), fails under CI."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser test must run, but {reason}")
        pytest.skip(reason)
    return shutil.which("chromium"), shutil.which("chromedriver")  # type: ignore[return-value]


@contextlib.contextmanager
def chromium(size: tuple[int, int] = LAPTOP, *, mobile: bool = False) -> Iterator[Any]:
    """Headless Chromium driven by selenium, with a fresh profile, its viewport exactly ``size`` CSS pixels at
    scale 1 (``mobile``: laid out as a phone does, honouring the viewport meta tag); the browser's console is kept
    for ``driver.get_log("browser")``."""
    binary, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="gatelens-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary  # with both paths given, selenium never looks for (or fetches) a driver
        for flag in [*FLAGS, "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            driver.set_page_load_timeout(60)  # a hung browser fails the test instead of stalling the suite
            # The window's size includes the browser's frame; the viewport is set exactly instead.
            metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            yield driver
        finally:
            driver.quit()


def assert_renders(
    path: str | os.PathLike[str],
    screenshot: str | os.PathLike[str] | None = None,
    *,
    size: tuple[int, int] = LAPTOP,
    mobile: bool = False,
) -> Path:
    """Open the report at ``path`` in headless Chromium at ``size`` (``mobile``: as a phone), save a screenshot of
    the first screen (to ``screenshot``, default ``<report>-screenshot.png`` beside the report) and check that the
    page rendered (:func:`check_rendered`). Returns the screenshot's path."""
    with chromium(size, mobile=mobile) as driver:
        return check_rendered(driver, path, screenshot)


def check_rendered(driver: Any, path: str | os.PathLike[str], screenshot: str | os.PathLike[str] | None = None) -> Path:
    """Load ``path`` in ``driver``, save a screenshot of the first screen, and check that

    - the screenshot is not blank: ≥ 3 % of its pixels are not white and its brightness varies;
    - every <img> loaded and decoded (complete, naturalWidth > 0), and there is at least one;
    - the console holds no error (level SEVERE: failed or refused loads, CSP violations, broken images);
    - nothing is wider than the window (no sideways scrolling) and the findings start on the first screen."""
    path = Path(path).resolve()
    screenshot = Path(screenshot) if screenshot is not None else path.with_name(f"{path.stem}-screenshot.png")
    driver.get(path.as_uri())
    state = driver.execute_script(
        """
        const findings = document.getElementById("findings");
        return {
            ready: document.readyState,
            images: Array.from(document.images, (img) => ({
                alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
            })),
            scrollWidth: document.documentElement.scrollWidth,
            innerWidth: window.innerWidth,
            innerHeight: window.innerHeight,
            findingsTop: findings === null ? null : findings.getBoundingClientRect().top,
        };
        """
    )
    if not driver.save_screenshot(str(screenshot)):
        raise AssertionError(f"chromium took no screenshot of {path}")
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert state["ready"] == "complete", state
    assert not errors, f"console errors in {path.name}: {errors}"
    assert state["images"], f"{path.name} has no images"
    broken = [img for img in state["images"] if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert state["scrollWidth"] <= state["innerWidth"], f"wider than the window: {state}"
    assert state["findingsTop"] is not None and 0 <= state["findingsTop"] < state["innerHeight"], state
    pixels = imread(screenshot)[..., :3]  # floats in [0, 1]
    screen = (pixels.shape[1], pixels.shape[0])
    assert screen == (state["innerWidth"], state["innerHeight"]), (
        f"the page is laid out for a {state['innerWidth']}×{state['innerHeight']} px window on a "
        f"{screen[0]}×{screen[1]} screen: is the viewport meta tag missing?"
    )
    brightness = pixels.mean(axis=-1)
    assert (brightness < 0.9).mean() > 0.03 and brightness.std() > 0.05, "the screenshot is (nearly) blank"
    return screenshot


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(tmp_path_factory.mktemp("report") / "report.html", **sample_report())


def test_report_renders_on_a_laptop_screen(report: Path) -> None:
    screenshot = assert_renders(report)
    assert screenshot == report.with_name("report-screenshot.png")
    assert imread(screenshot).shape[:2] == (LAPTOP[1], LAPTOP[0])  # the viewport is the size asked for


def test_findings_stack_on_a_phone(report: Path, tmp_path: Path) -> None:
    """On a narrow screen the model columns stack: each cell below the previous one, naming its model."""
    with chromium(PHONE, mobile=True) as driver:
        check_rendered(driver, report, tmp_path / "phone.png")
        cells = driver.execute_script(
            """
            const row = document.querySelector("table.findings tbody tr");
            return Array.from(row.querySelectorAll("td"), (td) => {
                const box = td.getBoundingClientRect(), label = td.querySelector(".model");
                return {top: box.top, bottom: box.bottom, width: box.width,
                        label: getComputedStyle(label).display !== "none" ? label.textContent : null};
            });
            """
        )
    assert [cell["label"] for cell in cells] == ["GRU", "Elman"]
    assert cells[1]["top"] >= cells[0]["bottom"] - 1 and min(cell["width"] for cell in cells) > 0.8 * PHONE[0] - 64


def test_an_external_reference_is_caught(report: Path, tmp_path: Path) -> None:
    """The check itself: an image from the network (refused by the page's CSP, and unreachable anyway) fails it."""
    broken = tmp_path / "broken.html"
    text = report.read_text(encoding="utf-8")
    broken.write_text(text.replace("<figcaption>", '<img src="https://example.invalid/x.png" alt="x"><figcaption>', 1))
    with pytest.raises(AssertionError, match="console errors|did not load"):
        assert_renders(broken)


def test_blank_page_is_caught(tmp_path: Path) -> None:
    """The check itself: a page that shows nothing fails it (here: its one image is a white square)."""
    buffer = io.BytesIO()
    imsave(buffer, np.ones((4, 4, 3)), format="png")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    blank = tmp_path / "blank.html"
    blank.write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>blank</title></head>'
        f'<body><main id="findings"><img src="{uri}" alt="white" width="4" height="4"></main></body></html>',
        encoding="utf-8",
    )
    with pytest.raises(AssertionError, match="blank"):
        assert_renders(blank)


def test_without_the_browser_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs chromium, chromedriver"):
        _browser_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set, so the browser test must run"):
        _browser_or_skip()
