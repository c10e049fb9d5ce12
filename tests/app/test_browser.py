"""The page in headless Chromium: Run on the default preset, both videos play, the heatmap renders; a screenshot.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. Skipped when they are missing, except
under CI (`CI` set), where that is a failure. `BWCACHE_SCREENSHOT=1` saves the screenshot to docs/screenshot.png
(any other value: to that path); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

import app
from testing_utils import browser
from bwcache import ui

pytestmark = pytest.mark.browser

TINY_READY = "tiny-shapes" in app.PRESETS and (Path(app.ROOT) / "assets" / "tiny-shapes" / "config.json").is_file()
WAN = "wan2.1-t2v-1.3b"


def screenshot_path(tmp_path: Path) -> Path:
    target = os.environ.get("BWCACHE_SCREENSHOT", "")
    if target.lower() in ("1", "true", "yes"):
        return Path(app.ROOT) / "docs" / "screenshot.png"
    return Path(target) if target else tmp_path / "screenshot.png"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    reason = browser.missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    if not TINY_READY:
        # Until the Tiny Shapes weights exist, run the Wan preset with a tiny random Wan pipeline.
        from testing_utils.tiny_wan import build_prompt_wan_pipeline

        app.PIPELINE_OVERRIDES[WAN] = build_prompt_wan_pipeline()
    saved_root, app.OUTPUT_ROOT = app.OUTPUT_ROOT, tmp_path_factory.mktemp("outputs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    driver = browser.start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        yield driver
    finally:
        driver.quit()
        app.demo.close()
        app.PIPELINE_OVERRIDES.pop(WAN, None)
        app.OUTPUT_ROOT = saved_root


def test_run_plays_both_videos_and_draws_the_heatmap(page, tmp_path):
    # The page fills the controls from the default preset when it loads.
    browser.wait_for(page, "const t = document.querySelector('#prompt textarea'); return t && t.value", 30,
                     "the prompt to be filled from the preset")
    if not TINY_READY:
        browser.choose(page, "preset", app.PRESETS[WAN].label)
        wan_prompt = app.PRESETS[WAN].defaults["prompt"]
        browser.wait_for(page, f"return document.querySelector('#prompt textarea').value == {wan_prompt!r}", 20,
                         "the Wan preset's prompt")
        browser.click(page, "#advanced-settings button, #advanced-settings .label-wrap")
        for elem_id, value in (("steps", 4), ("frames", 5), ("height", 256), ("width", 256)):
            browser.fill(page, elem_id, value)
        browser.click(page, "#advanced-settings button, #advanced-settings .label-wrap")

    # δ as typed into the slider's box is the δ the run uses.
    browser.fill(page, "threshold", 0.25)
    time.sleep(0.5)
    browser.click(page, "#run-button")
    playing = browser.wait_for(page, browser.VIDEOS_PLAYING, 180, "both videos to play")
    assert isinstance(playing, list), f"a video failed to play: {playing}"
    for width, height, current_time, src in playing:
        assert width >= 256 and height >= 256 and current_time > 0 and src.endswith(".mp4")
    rendered = browser.wait_for(page, browser.HEATMAP_RENDERED, 60, "the heatmap")
    assert rendered["types"][0] == "heatmap" and "reused" in rendered["names"]
    summary = page.execute_script("return document.querySelector('#summary').innerText")
    assert "speedup" in summary and "uncached" in summary and "δ=0.25" in summary
    assert not page.execute_script(browser.ERROR_TOAST)

    # The whole page, top to bottom, with the results in view.
    browser.fit_window_to_page(page)
    browser.click(page, "h1")  # move the pointer off the Run button
    time.sleep(1)  # let the button's hover colour fade out
    browser.wait_for(page, browser.VIDEOS_PLAYING, 30, "the videos after resizing")
    target = screenshot_path(tmp_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(target)) and target.stat().st_size > 10_000

    # What the cached run measured: in block-wise mode (the default preset's), the distances its decisions took.
    browser.click_text(page, "#heatmap-view label", ui.HEATMAP_VIEWS["bwcache"])
    browser.wait_for(page, f"const r = (() => {{{browser.HEATMAP_CELLS}}})(); return r && r.title.includes('BWCache run')",
                     20, "the cached run's own heatmap")
    measured = page.execute_script(browser.HEATMAP_CELLS)
    assert measured["cells"] > 0, measured
    browser.click_text(page, "#heatmap-view label", ui.HEATMAP_VIEWS["uncached"])
    browser.wait_for(page, f"const r = (() => {{{browser.HEATMAP_CELLS}}})(); return r && r.title.includes('Uncached')",
                     20, "the uncached distance map")
    full = page.execute_script(browser.HEATMAP_CELLS)
    # The uncached map has every distance; the cached run measured only where it could decide.
    assert measured["cells"] < full["cells"]


def test_example_loads_without_running_a_model(page):
    if not app.EXAMPLES:
        pytest.skip("no precomputed examples in assets/examples")
    before = page.execute_script("return document.querySelector('#baseline-video video').src")
    browser.click(page, "#examples button")
    browser.wait_for(page, f"const v = document.querySelector('#baseline-video video');"
                           f" return v && v.src != {before!r}", 30, "the example's video")
    playing = browser.wait_for(page, browser.VIDEOS_PLAYING, 30, "the example's videos to play")
    assert isinstance(playing, list)
    assert "Precomputed example" in page.execute_script("return document.querySelector('#summary').innerText")
    prompt = page.execute_script("return document.querySelector('#prompt textarea').value")
    assert prompt == app.EXAMPLES[0]["record"]["prompt"]


def example_button(page, record):
    browser.wait_for(page, "const t = document.querySelector('#prompt textarea'); return t && t.value", 30,
                     "the page to load")
    # By position: the buttons are the examples in app.EXAMPLES' order.
    index = [e["record"] for e in app.EXAMPLES].index(record)
    page.execute_script("const b = document.querySelectorAll('#examples button')[arguments[0]];"
                        " b.scrollIntoView({block: 'center'}); b.click();", index)


def test_example_from_a_first_frame_reproduces_its_record_when_run(page):
    from_image = [e for e in app.EXAMPLES if e["record"].get("image")]
    if not from_image:
        pytest.skip("no precomputed example made from a first frame")
    record = from_image[0]["record"]
    example_button(page, record)
    browser.wait_for(page, f"return document.querySelector('#prompt textarea').value == {record['prompt']!r}"
                           " && document.querySelector('#summary').innerText.includes('Precomputed')", 30,
                     "the example to load")
    # The image it was made from is shown beside the videos and put in the form, so Run starts from it too.
    browser.wait_for(page, "const i = document.querySelector('#input-image img'); return i && i.naturalWidth > 0", 30,
                     "the input image beside the videos")
    browser.wait_for(page, "const i = document.querySelector('#image img'); return i && i.naturalWidth > 0", 30,
                     "the first frame in the form")
    before = set(Path(app.OUTPUT_ROOT).iterdir())
    browser.click(page, "#run-button")
    browser.wait_for(page, "const t = document.querySelector('#summary').innerText;"
                           " return t.includes('speedup') && !t.includes('Precomputed') && t", 240, "the run to finish")
    (folder,) = set(Path(app.OUTPUT_ROOT).iterdir()) - before
    rerun = json.loads((folder / "run.json").read_text())
    assert rerun["image"]["size"] == record["image"]["size"] and (folder / "input.png").is_file()
    assert rerun["settings"] == record["settings"] and rerun["seed"] == record["seed"]
    # The same model, seed and first frame: the same decisions and the same video.
    for name, branch in record["trace"]["branches"].items():
        assert rerun["trace"]["branches"][name]["reused"] == branch["reused"]
    assert rerun["psnr"] == pytest.approx(record["psnr"], abs=0.01)


@pytest.mark.skipif(not TINY_READY, reason="the Tiny Shapes weights (assets/tiny-shapes/) are not there")
def test_an_uploaded_first_frame_starts_the_video(page, tmp_path):
    from PIL import Image

    browser.choose(page, "preset", app.PRESETS["tiny-shapes"].label)
    pixels = Image.new("RGB", (64, 48))
    pixels.paste((255, 255, 0), (40, 10, 52, 22))  # a yellow square, given larger than the video (it is fitted)
    path = tmp_path / "first.png"
    pixels.save(path)
    browser.fill(page, "prompt", "a yellow square moving left")
    upload = browser.wait_for(page, "return document.querySelector('#image input[type=file]')", 20, "the image input")
    upload.send_keys(str(path))
    browser.wait_for(page, "const i = document.querySelector('#image img'); return i && i.naturalWidth > 0", 30,
                     "the uploaded image in the form")
    if not page.execute_script("return document.querySelector('#steps input')"):  # the accordion may be open already
        browser.click(page, "#advanced-settings button, #advanced-settings .label-wrap")
        browser.wait_for(page, "return document.querySelector('#steps input')", 10, "the advanced settings")
    browser.fill(page, "steps", 10)
    before = set(Path(app.OUTPUT_ROOT).iterdir())
    browser.click(page, "#run-button")
    browser.wait_for(page, "const t = document.querySelector('#summary').innerText;"
                           " return t.includes('speedup') && !t.includes('Precomputed') && t", 240, "the run to finish")
    (folder,) = set(Path(app.OUTPUT_ROOT).iterdir()) - before
    record = json.loads((folder / "run.json").read_text())
    assert record["prompt"] == "a yellow square moving left" and record["settings"]["num_inference_steps"] == 10
    assert record["image"]["note"] == "the image was 64×48, cropped around its centre to 48×48 and resized to the video's 32×32"
    browser.wait_for(page, "const i = document.querySelector('#input-image img'); return i && i.naturalWidth > 0", 30,
                     "the input image beside the videos")
    playing = browser.wait_for(page, browser.VIDEOS_PLAYING, 60, "both videos to play")
    assert isinstance(playing, list), f"a video failed to play: {playing}"
    rendered = browser.wait_for(page, browser.HEATMAP_RENDERED, 60, "the heatmap")
    assert rendered["types"][0] == "heatmap"
    assert not page.execute_script(browser.ERROR_TOAST)


def test_tuning_plot_fits_its_tab_and_follows_a_typed_threshold(page):
    blockwise = [e for e in app.EXAMPLES if e["record"]["config"]["mode"] == "blockwise"]
    if not blockwise:
        pytest.skip("no precomputed block-wise example")
    record = blockwise[0]["record"]
    browser.wait_for(page, "const t = document.querySelector('#prompt textarea'); return t && t.value", 30,
                     "the page to load")
    # Shown once, then hidden while the example's results fill it.
    browser.select_tab(page, "Threshold tuning")
    browser.wait_for(page, "return document.querySelector('#tuning-plot')", 20, "the tuning tab")
    browser.select_tab(page, "Comparison")
    example_button(page, record)
    delta = record["config"]["threshold"]
    browser.wait_for(page, "const t = document.querySelector('#tuning-text').textContent.trim();"
                           f" return t.startsWith('At δ = {delta:g}:') && t.includes('estimated')", 30,
                     "the tuning view to follow the example while its tab is hidden")
    assert page.execute_script("return document.querySelector('#tuning-plot').getBoundingClientRect().width") == 0
    browser.select_tab(page, "Threshold tuning")
    fitted = browser.wait_for(
        page, f"const w = (() => {{{browser.PLOT_WIDTHS % 'tuning-plot'}}})();"
              " return w && w[2].includes('estimated') && Math.abs(w[0] - w[1]) <= 0.02 * w[1] && w", 10,
        "the tuning plot to fill its container")
    assert fitted[1] > 400
    text = page.execute_script("return document.querySelector('#tuning-text').innerText")
    assert text.startswith(f"At δ = {delta:g}:") and "estimated" in text
    assert f"Measured at this δ: {record['reuse_fraction']:.1%}" in text

    # Typing δ and pressing Enter updates the view with the focus still in the box.
    browser.type_and_enter(page, "threshold", 0.1)
    browser.wait_for(page, "return document.querySelector('#tuning-text').innerText.startsWith('At δ = 0.1:')", 20,
                     "the tuning text to follow the typed δ")
    assert page.execute_script("return document.activeElement.closest('#threshold') !== null")
    chosen = page.execute_script(
        "const p = document.querySelector('#tuning-plot .js-plotly-plot');"
        " return p.layout.shapes.filter(s => s.name == 'chosen').map(s => s.x0)")
    assert chosen == [0.1]
    assert not page.execute_script(browser.ERROR_TOAST)
