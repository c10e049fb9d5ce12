"""The app served on a local port and driven over HTTP with gradio_client, as API users and the page do."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from PIL import Image
import numpy as np
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
from bwcache.video import probe_video
from testing_utils.tiny_wan import build_prompt_wan_pipeline

pytestmark = pytest.mark.server

WAN = "wan2.1-t2v-1.3b"
WAN_SMALL = dict(num_inference_steps=4, num_frames=5, height=256, width=256)
TINY_READY = "tiny-shapes" in app.PRESETS and (Path(app.ROOT) / "assets" / "tiny-shapes" / "config.json").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app.PIPELINE_OVERRIDES[WAN] = build_prompt_wan_pipeline()
    saved_root, app.OUTPUT_ROOT = app.OUTPUT_ROOT, tmp_path_factory.mktemp("outputs")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    finally:
        app.demo.close()
        app.PIPELINE_OVERRIDES.pop(WAN, None)
        app.OUTPUT_ROOT = saved_root


def check_outputs(result, frames: int):
    baseline, cached, plot, summary, record, seed, peer, files, image = result
    assert image["value"] is None and image["visible"] is False  # no first frame was given: hidden
    for path in (baseline, cached):
        info = probe_video(path)
        assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
        assert info["n_frames"] == frames > 1
        assert info["width"] % 2 == 0 and info["height"] % 2 == 0
    assert plot["type"] == "plotly"
    figure = json.loads(plot["plot"])
    types = [trace.get("type") for trace in figure["data"]]
    names = [trace.get("name") for trace in figure["data"]]
    assert types[0] == "heatmap" and "reused" in names
    assert "speedup" in summary
    for key in ("speedup", "baseline_seconds", "bwcache_seconds", "psnr", "ssim", "reuse_fraction", "trace",
                "baseline_trace", "trigger_steps", "config", "device", "seed"):
        assert key in record, key
    assert record["trace"]["branches"] and record["speedup"] > 0
    assert seed == record["seed"]
    assert peer is None
    assert {Path(f).name for f in files} >= {"run.json", "trace.csv", "side_by_side.mp4"}
    return record


def test_api_lists_compare_with_its_named_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")
    named = api["named_endpoints"]
    assert set(named) == {"/compare", "/sweep", "/calibrate"}
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in named["/compare"]["parameters"]]
    assert {"prompt", "preset", "threshold", "seed"} <= set(params) and params[:4] == ["prompt", "preset", "threshold",
                                                                                       "seed"]
    assert all(p["parameter_has_default"] for p in named["/compare"]["parameters"])
    # Both videos, the heatmap, the summary, the record, the seed, the peer's video, the files, the input image.
    assert len(named["/compare"]["returns"]) == 9
    calibrate = named["/calibrate"]["parameters"]
    assert [p["parameter_name"] for p in calibrate][:5] == ["target_kind", "target", "budget", "prompts", "preset"]
    assert all(p["parameter_has_default"] for p in calibrate)
    # The frontier figure, the summary, the profile file, the calibration record.
    assert len(named["/calibrate"]["returns"]) == 4


def test_compare_over_http(client):
    result = client.predict(prompt="a cat", preset=WAN, threshold=0.15, seed=7, **WAN_SMALL, api_name="/compare")
    record = check_outputs(result, frames=5)
    assert record["preset"] == WAN and record["seed"] == 7 and record["prompt"] == "a cat"
    assert record["settings"]["guidance_scale"] == app.PRESETS[WAN].defaults["guidance_scale"]


@pytest.mark.skipif(not TINY_READY, reason="the Tiny Shapes weights (assets/tiny-shapes/) are not there")
def test_compare_default_preset_over_http(client):
    result = client.predict(prompt="a blue circle moving up", threshold=0.15, seed=1, num_inference_steps=8,
                            api_name="/compare")
    record = check_outputs(result, frames=app.PRESETS["tiny-shapes"].defaults["num_frames"])
    assert record["preset"] == "tiny-shapes"


@pytest.mark.skipif(not TINY_READY, reason="the Tiny Shapes weights (assets/tiny-shapes/) are not there")
def test_image_to_video_over_http(client, tmp_path):
    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    pixels[10:22, 30:42] = (0, 255, 255)  # a cyan square, given larger than the video (it is fitted)
    path = tmp_path / "first.png"
    Image.fromarray(pixels).save(path)
    result = client.predict(prompt="a cyan square moving down", image=handle_file(str(path)), threshold=0.15,
                            seed=1, num_inference_steps=10, api_name="/compare")
    baseline, cached, plot, summary, record, seed, peer, files, image = result
    assert record["image"]["size"] == [32, 32] and "resized to the video's 32×32" in record["image"]["note"]
    shown = np.asarray(Image.open(image["value"] if isinstance(image, dict) else image).convert("RGB"))
    assert np.array_equal(shown, np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.LANCZOS)))
    assert "input.png" in {Path(f).name for f in files}
    assert "First frame" in summary or "first frame" in summary
    # An upload that is not an image is refused by name, and the app keeps serving.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"just some text")
    with pytest.raises(AppError, match="Image is not a PNG, JPEG or WebP image"):
        client.predict(prompt="a cyan square moving down", image=handle_file(str(bad)), num_inference_steps=10,
                       api_name="/compare")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "a cat", "height": 100}, "Height = 100"),
        ({"prompt": "a cat", "num_frames": 6}, "Frames = 6"),
        ({"prompt": "a cat", "reuse_interval": "often"}, "R (reuse interval)"),
        ({"prompt": "a cat", "threshold": 1.5}, "1.5"),
        # Not rounded on the way in: the app's own check sees the number as sent.
        ({"prompt": "a cat", "num_inference_steps": 4.5}, "must be a whole number, got 4.5"),
        ({"prompt": "a cat", "seed": 1.5}, "1.5"),
        # Only true or false randomizes (or not): text and numbers are refused, not read as true.
        ({"prompt": "a cat", "randomize_seed": "no"}, "Randomize seed must be true or false, got 'no'"),
        ({"prompt": "a cat", "randomize_seed": 1}, "Randomize seed must be true or false, got 1"),
        # Menus: a value not among the choices is named by the field, not by Gradio.
        ({"prompt": "a cat", "preset": "nope"}, "Model preset must be one of"),
        ({"prompt": "a cat", "profile": "turbo"}, "Profile must be one of default, fast"),
        ({"prompt": "a cat", "mode": "turbo"}, "Mode must be one of paper, blockwise, static, got 'turbo'"),
        ({"prompt": "a cat", "indicator_feature": "attn"}, "Indicator feature must be one of hidden_states, modulated"),
        ({"prompt": "a cat", "compare_with": "teacache"}, "Compare against: unknown method 'teacache'"),
        # A huge number or control characters come back short and escaped.
        ({"prompt": "a cat", "seed": 10.0**308}, "Seed = 100000000000000001097906362944045541740… is outside"),
        ({"prompt": "a cat", "mode": "a\x00b\x1b[31m"}, "got 'a\\x00b\\x1b[31m'"),
    ],
)
def test_bad_input_raises_and_the_server_keeps_serving(client, kwargs, message):
    request = {"preset": WAN, "threshold": 0.15, "seed": 0, **WAN_SMALL, **kwargs}
    with pytest.raises(AppError) as excinfo:
        client.predict(**request, api_name="/compare")
    assert message in str(excinfo.value) and len(str(excinfo.value)) < 600


def test_unavailable_model_raises_and_a_good_request_works_after(client):
    with pytest.raises(AppError, match="needs a GPU|could not be loaded"):
        client.predict(prompt="a cat", preset="wan2.1-t2v-14b", threshold=0.15, seed=0, **WAN_SMALL,
                       api_name="/compare")
    result = client.predict(prompt="a dog", preset=WAN, threshold=0.3, seed=2, **WAN_SMALL, api_name="/compare")
    check_outputs(result, frames=5)


def test_sweep_over_http(client):
    plot, table, csv_file = client.predict(prompt="a cat", preset=WAN, thresholds="0.1, 0.3", seed=0, **WAN_SMALL,
                                           api_name="/sweep")
    assert json.loads(plot["plot"])["data"][0]["mode"] == "markers+text"
    assert [row[0] for row in table["data"]] == [0.1, 0.3]
    assert Path(csv_file).read_text().startswith("threshold,")


def test_a_prompt_with_no_known_word_is_refused_and_the_server_keeps_serving(client):
    with pytest.raises(AppError) as excinfo:
        client.predict(prompt="!!! ???", preset="tiny-shapes", threshold=0.3, seed=0, num_inference_steps=4,
                       num_frames=8, api_name="/compare")
    assert "no word the Tiny Shapes model knows" in str(excinfo.value)
    with pytest.raises(AppError) as excinfo:
        client.predict(prompt="a red square moving right", preset="tiny-shapes", negative_prompt="blurry",
                       threshold=0.3, seed=0, num_inference_steps=4, num_frames=8, api_name="/compare")
    assert "negative prompt contains words outside" in str(excinfo.value)
    result = client.predict(prompt="a red square moving right", preset="tiny-shapes", threshold=0.3, seed=0,
                            num_inference_steps=4, num_frames=8, api_name="/compare")
    assert result[4]["prompt"] == "a red square moving right"


def test_threshold_left_out_or_null_is_the_presets_default(client):
    wan_default = app.PRESETS[WAN].bwcache["threshold"]
    assert wan_default != app.PRESETS["tiny-shapes"].bwcache["threshold"]
    for extra in ({}, {"threshold": None}):
        result = client.predict(prompt="a cat", preset=WAN, seed=0, **WAN_SMALL, **extra, api_name="/compare")
        assert result[4]["config"]["threshold"] == wan_default, extra


@pytest.mark.parametrize(
    "value,message",
    [(-0.1, "δ (threshold) = -0.1 is outside the allowed range 0 to 1"),
     ("often", "δ (threshold) must be a number from 0 to 1, got 'often'")],
)
def test_a_bad_threshold_gets_our_message(client, value, message):
    with pytest.raises(AppError) as excinfo:
        client.predict(prompt="a cat", preset=WAN, threshold=value, seed=0, **WAN_SMALL, api_name="/compare")
    assert message in str(excinfo.value)


@pytest.mark.skipif(not TINY_READY, reason="the Tiny Shapes weights (assets/tiny-shapes/) are not there")
def test_calibrate_over_http_and_compare_with_its_profile(client):
    plot, summary, profile, record = client.predict(target_kind="speedup", target=1.2, budget=2,
                                                    prompts="a red square moving right", preset="tiny-shapes",
                                                    num_inference_steps=10, num_frames=8, api_name="/calibrate")
    names = [trace.get("name") for trace in json.loads(plot["plot"])["data"]]
    assert "measured candidates" in names and ("chosen" in names or "best measured (target not met)" in names)
    assert "speedup ≥ 1.2×" in summary
    saved = json.loads(Path(profile).read_text())
    assert saved["format"] == "bwcache-profile" and saved["setting"]["preset"] == "tiny-shapes"
    assert record["target"] == {"speedup": 1.2} and len(record["candidates"]) >= 1
    # The file on the server (under the app's output folder) is what /compare takes as its profile.
    server_path = record["profile_file"]
    assert Path(server_path).parent.parent == Path(app.OUTPUT_ROOT).resolve()
    result = client.predict(prompt="a blue circle moving left", preset="tiny-shapes", profile=server_path, seed=1,
                            num_inference_steps=10, num_frames=8, api_name="/compare")
    assert result[4]["profile"] == server_path and result[4]["config"]["mode"] == saved["bwcache"]["mode"]
    # A bad budget is refused by name, and the app keeps serving.
    with pytest.raises(AppError, match="Budget must be a whole number of cached generations from 1 to 100, got 0"):
        client.predict(target=30, budget=0, preset="tiny-shapes", api_name="/calibrate")
    with pytest.raises(AppError, match="Profile must be one of"):
        client.predict(prompt="a cat", preset="tiny-shapes", profile=str(Path(profile)), api_name="/compare")
