"""The HTML report in headless Chromium: no console errors, no broken images, readable at desktop and phone
widths. Screenshots are saved under results/artifacts/ (kept by CI). Needs Debian's chromium and
chromium-driver (installed by .ci/run) and the selenium package (dev extra)."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "results" / "artifacts"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium + chromium-driver not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_report import make_run  # the synthetic run folder of the report tests

    from benchmarks.report.html import build_report

    run = make_run(tmp_path_factory.mktemp("run"), failed={"arm/x": "ValueError: boom"})
    return build_report(run)


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


@pytest.mark.parametrize("width, name", [(1280, "desktop"), (390, "phone")])
def test_report_renders_without_errors(report, driver, width, name):
    driver.set_window_size(width, 900)
    driver.get(report.as_uri())
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    broken = driver.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 40))")
    assert broken == []
    n_img = driver.execute_script("return document.images.length + document.querySelectorAll('svg').length")
    assert n_img >= 4  # the figures are there
    # nothing but tables (in their scroll wrappers) may be wider than the viewport
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 2, f"page scrolls sideways by {overflow}px at {width}px"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(width, min(height, 6000))
    assert driver.save_screenshot(str(ARTIFACTS / f"report_{name}.png"))
