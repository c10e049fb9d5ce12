"""Headless Chromium for the browser test: Debian's `chromium` driven by its `chromium-driver` through Selenium.

Debian's build plays H.264 (proprietary codecs are enabled there), unlike Playwright's bundled Chromium.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
)


def find_executable(env: str, names) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    if not find_executable("CHROMIUM", CHROMIUM_NAMES):
        return "chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not find_executable("CHROMEDRIVER", DRIVER_NAMES):
        return "chromedriver is not installed (apt-get install -y chromium-driver)"
    return None


def start_chromium(profile_dir: Path):
    """A headless Chromium with a fresh profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_executable("CHROMIUM", CHROMIUM_NAMES)
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile_dir}",):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    service = Service(executable_path=find_executable("CHROMEDRIVER", DRIVER_NAMES))
    return webdriver.Chrome(service=service, options=options)


def wait_for(driver, script: str, timeout: float, what: str, poll: float = 0.25):
    """Poll a JavaScript expression (the body of a function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last value {value!r})")


def fill(driver, elem_id: str, text) -> None:
    """Replace the text of the input inside a Gradio component and commit it (blur)."""
    from selenium.webdriver.common.keys import Keys

    _replace_text(driver, elem_id, text, Keys.TAB)


def choose(driver, elem_id: str, label: str) -> None:
    """Pick an option of a Gradio dropdown by its label."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(label)
    field.send_keys(Keys.ENTER)
    field.send_keys(Keys.ESCAPE)  # close the option list so it does not cover the controls below
    driver.find_element(By.TAG_NAME, "h1").click()


def type_and_enter(driver, elem_id: str, text) -> None:
    """Replace the text of the input inside a Gradio component and press Enter, keeping the focus there."""
    from selenium.webdriver.common.keys import Keys

    _replace_text(driver, elem_id, text, Keys.ENTER)


def _replace_text(driver, elem_id: str, text, last_key) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(text))
    field.send_keys(last_key)


def click_text(driver, selector: str, text: str) -> None:
    """Click the first element matching `selector` whose text contains `text`."""
    from selenium.webdriver.common.by import By

    # textContent, not the rendered text: an element scrolled out of its container renders no text.
    matches = [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if text in (e.get_attribute("textContent") or "")]
    if not matches:
        raise LookupError(f"no {selector} with the text {text!r}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", matches[0])


def select_tab(driver, label: str) -> None:
    click_text(driver, "button[role=tab]", label)


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


# JavaScript checks, as function bodies for `execute_script`.
VIDEOS_PLAYING = """
const videos = [...document.querySelectorAll('#baseline-video video, #bwcache-video video')];
if (videos.length < 2) return false;
for (const v of videos) {
  if (v.error) return 'error ' + v.error.code + ' ' + (v.error.message || '');
  if (v.paused) v.play().catch(() => {});
}
return videos.every(v => v.videoWidth > 0 && v.readyState >= 2 && v.currentTime > 0)
  ? videos.map(v => [v.videoWidth, v.videoHeight, v.currentTime, v.src]) : false;
"""

HEATMAP_RENDERED = """
const plot = document.querySelector('#heatmap .js-plotly-plot');
if (!plot || !plot.data) return false;
const types = plot.data.map(t => t.type || 'scatter');
const names = plot.data.map(t => t.name);
return types.includes('heatmap') && plot.querySelector('.hm, .heatmaplayer image, image') ? {types, names} : false;
"""

ERROR_TOAST = """
const toast = document.querySelector('.toast-body.error, [data-testid="toast-body"]');
return toast ? toast.innerText : '';
"""


def fit_window_to_page(driver, width: int = 1440, max_height: int = 2400) -> int:
    """Resize the window to the height of the page's content, so one screenshot shows all of it."""
    driver.set_window_size(width, 900)
    time.sleep(0.5)
    # Gradio stretches its container to the window and scrolls inside it: measure the content, not the document.
    bottom = driver.execute_script(
        "const c = document.querySelector('.contain') || document.body;"
        "return Math.ceil(c.getBoundingClientRect().bottom - document.body.getBoundingClientRect().top);"
    )
    height = min(max(int(bottom) + 200, 900), max_height)  # the footer, and the window's own chrome
    driver.set_window_size(width, height)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    return height

# [drawn width, container width, title] of the Plotly plot inside the component `#id` (set with `%s`).
PLOT_WIDTHS = """
const plot = document.querySelector('#%s .js-plotly-plot');
const svg = plot && plot.querySelector('.main-svg');
if (!svg || !plot._fullLayout) return false;
return [svg.getBoundingClientRect().width, plot.getBoundingClientRect().width,
        (plot.layout.title && plot.layout.title.text) || ''];
"""

# Of the heatmap: its title and how many of its cells hold a distance.
HEATMAP_CELLS = """
const plot = document.querySelector('#heatmap .js-plotly-plot');
if (!plot || !plot._fullData || !plot._fullData.length) return false;
const rows = Array.from(plot._fullData[0].z || [], row => Array.from(row));
const cells = rows.flat().filter(v => v !== null && !Number.isNaN(v)).length;
return {title: (plot.layout.title && plot.layout.title.text) || '', cells, total: rows.flat().length};
"""
