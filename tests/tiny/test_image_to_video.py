"""Image-to-video on the embedded model, as users run it: the runner, the saved files and the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bwcache.images import as_frame
from bwcache.presets import load_preset
from bwcache.report import INPUT_IMAGE, save_comparison
from bwcache.runner import run_comparison

SMALL = {"num_inference_steps": 10, "num_frames": 8, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def preset():
    return load_preset("tiny-shapes")


@pytest.fixture(scope="module")
def first_frame():
    """A frame like the model's own: a yellow circle on black, given larger than the video (it is fitted)."""
    yy, xx = np.mgrid[:64, :96]
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[(yy - 30) ** 2 + (xx - 40) ** 2 < 100] = (255, 255, 0)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def comparison(preset, first_frame):
    return run_comparison(preset, prompt="a yellow circle moving right", seed=2, image=first_frame,
                          warmup_steps=2, tail_steps=1, **SMALL)


def test_the_embedded_preset_takes_an_optional_first_frame(preset):
    assert preset.image == "optional"


def test_both_videos_start_from_the_image_and_the_record_says_how_it_was_fitted(comparison):
    record = comparison.record["image"]
    assert record["size"] == [32, 32]
    assert record["note"] == "the image was 96×64, cropped around its centre to 64×64 and resized to the video's 32×32"
    expected = as_frame(comparison.image)
    for name, frames in (("uncached", comparison.baseline_frames), ("bwcache", comparison.bwcache_frames)):
        # Frame 0 is the image itself (the model replaces it before every step): equal to 8-bit rounding.
        assert np.abs(np.asarray(frames[0], dtype=np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
                      - expected).max() <= 1 / 255 + 1e-6, name
        psnr = record["first_frame_psnr"][name]
        assert psnr is None or psnr > 45, (name, psnr)  # None: identical (an infinite PSNR)
    assert comparison.record["reuse_fraction"] > 0  # the cache did reuse blocks in this run


def test_threshold_zero_with_an_image_is_bit_identical(preset, first_frame):
    record = run_comparison(preset, prompt="a yellow circle moving right", seed=2, image=first_frame, threshold=0.0,
                            **SMALL).record
    assert record["identical"] is True


def test_the_image_is_kept_beside_the_videos(comparison, tmp_path, first_frame):
    paths = save_comparison(comparison, tmp_path / "run")
    saved = Image.open(tmp_path / "run" / INPUT_IMAGE)
    assert saved.size == (32, 32)
    assert np.array_equal(np.asarray(saved), np.asarray(comparison.image))
    assert any(str(p).endswith(INPUT_IMAGE) for p in paths.values())


def test_images_are_refused_where_a_preset_cannot_use_them(preset, first_frame):
    text_only = dataclasses.replace(preset, image=None)
    with pytest.raises(ValueError, match="takes no image; leave it out, or choose an image-to-video preset"):
        run_comparison(text_only, prompt="a red square moving right", image=first_frame, **SMALL)
    needs_one = dataclasses.replace(preset, image="required")
    with pytest.raises(ValueError, match="makes a video from a first frame; give an image"):
        run_comparison(needs_one, prompt="a red square moving right", **SMALL)
    with pytest.raises(ValueError, match="is not a PNG, JPEG or WebP image"):
        run_comparison(preset, prompt="a red square moving right", image=b"GIF89a-not-really", **SMALL)


def test_the_cli_takes_an_image_and_keeps_it(tmp_path, first_frame):
    image = tmp_path / "first.png"
    first_frame.save(image)

    def compare(image_path, name):
        cmd = [sys.executable, "-m", "bwcache", "compare", "--preset", "tiny-shapes", "--prompt",
               "a yellow circle moving right", "--image", str(image_path), "--steps", "10", "--frames", "8",
               "--out-dir", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    done = compare(image, "run")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["image"]["size"] == [32, 32]
    assert (tmp_path / "run" / INPUT_IMAGE).is_file()
    again = compare(image, "run")  # the kept image counts among the files a second run would overwrite
    assert again.returncode != 0 and f"{INPUT_IMAGE}; pass --overwrite" in again.stderr
    bad = compare(tmp_path / "missing.png", "other")
    assert bad.returncode != 0 and "missing.png is not a file" in bad.stderr
    assert not (tmp_path / "other").exists()
