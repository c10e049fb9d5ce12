"""MP4 writing: real files encoded with the bundled ffmpeg and decoded back."""

import numpy as np
import pytest
import torch

from bwcache.report import SIDE_BY_SIDE_LABELS, upscale_pair
from bwcache.video import (band_height, label_band, pad_to_multiple, probe_video, read_video, side_by_side, to_uint8,
                           upscale, write_mp4)


def smooth_clip(t=6, h=48, w=64):
    """Smooth gradients: chroma subsampling and H.264 keep them close to the source."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [
        np.stack([x / w * 0.8 + 0.02 * i, y / h, 0.5 + 0.3 * np.sin((x + y + 2 * i) / 12)], axis=-1)
        for i in range(t)
    ]
    return np.clip(np.stack(frames), 0, 1).astype(np.float32)


def test_to_uint8_clips_and_rounds_never_wraps():
    x = np.array([-0.5, 0.0, 0.6 / 255, 0.499, 1.0, 1.7, np.nan], dtype=np.float32).reshape(1, 1, 7, 1)
    out = to_uint8(x).ravel().tolist()
    assert out == [0, 0, 1, 127, 255, 255, 0]
    u = np.array([[[[100, 200, 255]]]], dtype=np.uint8)
    assert to_uint8(u) is u  # uint8 is never rescaled (x255 would wrap 100 -> 156)
    assert to_uint8(torch.full((1, 2, 2, 3), 0.5)).max() == 128
    with pytest.raises(TypeError):
        to_uint8(np.zeros((1, 2, 2, 3), dtype=np.int32))


def test_upscale_integer_nearest_and_even():
    f = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    up = upscale(f, min_side=10)  # factor ceil(10/3) = 4 -> 12x20
    assert up.shape == (2, 12, 20, 3)
    assert np.array_equal(up[:, ::4, ::4], f)  # every source pixel becomes a 4x4 block
    assert np.array_equal(up[:, 3, 7], f[:, 0, 1])
    odd = upscale(np.zeros((1, 301, 303, 3), np.uint8), min_side=256)  # no scaling, only even padding
    assert odd.shape == (1, 302, 304, 3)
    assert upscale(np.zeros((32, 32, 3), np.uint8)).shape == (256, 256, 3)


def test_pad_to_multiple_keeps_pixel_positions():
    f = np.random.default_rng(0).integers(0, 255, (2, 5, 7, 3), dtype=np.uint8)
    p = pad_to_multiple(f, 2)
    assert p.shape == (2, 6, 8, 3)
    assert np.array_equal(p[:, :5, :7], f)
    assert np.array_equal(p[:, 5, :7], f[:, 4])  # edge replicated
    assert pad_to_multiple(f, 1) is f


def test_write_mp4_roundtrip(tmp_path):
    clip = smooth_clip()
    path = write_mp4(clip, tmp_path / "a.mp4", fps=8)
    assert path == str(tmp_path / "a.mp4")
    info = probe_video(path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["size"] == (64, 48)
    assert info["n_frames"] == 6
    assert info["fps"] == pytest.approx(8.0)
    decoded = read_video(path)
    assert decoded.shape == (6, 48, 64, 3)
    err = np.abs(decoded.astype(int) - to_uint8(clip).astype(int))
    assert err.mean() < 5 and np.median(err) <= 4
    with open(path, "rb") as fh:  # +faststart puts the moov atom before mdat
        data = fh.read()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")
    assert not [p for p in tmp_path.iterdir() if p.name != "a.mp4"]  # no temporary files left


def test_write_mp4_uint8_and_odd_size_is_padded_not_rescaled(tmp_path):
    clip = to_uint8(smooth_clip(t=3, h=33, w=45))
    path = write_mp4(clip, tmp_path / "odd.mp4", fps=16)
    info = probe_video(path)
    assert info["size"] == (46, 34) and info["n_frames"] == 3
    decoded = read_video(path)
    err = np.abs(decoded[:, :33, :45].astype(int) - clip.astype(int))
    assert err.mean() < 5  # alignment preserved: a rescale would shift content


def test_write_mp4_pad_to_16(tmp_path):
    path = write_mp4(smooth_clip(t=2, h=40, w=50), tmp_path / "m16.mp4", fps=8, pad_to=16)
    assert probe_video(path)["size"] == (64, 48)
    with pytest.raises(ValueError):
        write_mp4(smooth_clip(t=1), tmp_path / "bad.mp4", fps=8, pad_to=3)


def test_write_mp4_refuses_overwrite(tmp_path):
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"user data")
    with pytest.raises(FileExistsError):
        write_mp4(smooth_clip(t=2), target, fps=8)
    assert target.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]
    write_mp4(smooth_clip(t=2), target, fps=8, overwrite=True)
    assert probe_video(target)["n_frames"] == 2


def test_write_mp4_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_mp4(np.zeros((4, 8, 8), np.float32), tmp_path / "x.mp4", fps=8)
    with pytest.raises(ValueError):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4", fps=0)
    assert not list(tmp_path.iterdir())


def test_side_by_side():
    a = np.zeros((3, 4, 5, 3), np.float32)
    b = np.ones((3, 4, 6, 3), np.float32)
    s = side_by_side(a, b, gap=2, gap_value=128)
    assert s.shape == (3, 4, 13, 3) and s.dtype == np.uint8
    assert (s[:, :, :5] == 0).all() and (s[:, :, 5:7] == 128).all() and (s[:, :, 7:] == 255).all()
    with pytest.raises(ValueError, match="heights"):
        side_by_side(a, np.zeros((3, 5, 5, 3), np.float32))


def test_side_by_side_names_each_half_legibly_in_the_encoded_file(tmp_path):
    # A Tiny Shapes-sized pair (32x32), enlarged for display as the runner saves it.
    baseline, cached = upscale_pair(smooth_clip(t=4, h=32, w=32), 1.0 - smooth_clip(t=4, h=32, w=32))
    path = write_mp4(side_by_side(baseline, cached, labels=SIDE_BY_SIDE_LABELS), tmp_path / "sbs.mp4", fps=8)
    decoded = read_video(path).astype(np.float32)
    band = band_height(256)
    assert band >= 20 and decoded.shape == (4, 256 + band, 2 * 256 + 8, 3)
    left, right = decoded[:, :band, :256], decoded[:, :band, 264:]
    expected = {text: label_band(text, 256, band).astype(np.float32) for text in ("uncached", "BWCache")}
    # Each band shows its own label (light text on a dark band), and the two differ.
    assert np.abs(left - expected["uncached"]).mean() < 6 < np.abs(left - expected["BWCache"]).mean()
    assert np.abs(right - expected["BWCache"]).mean() < 6 < np.abs(right - expected["uncached"]).mean()
    for half in (left, right):
        light = (half[0].mean(axis=-1) > 160).sum()
        assert (half[0].mean(axis=-1) < 60).mean() > 0.7 and light > 150  # strokes of a ~19-pixel-high word
    # Below the bands, the clips themselves.
    assert np.abs(decoded[:, band:, :256] - baseline).mean() < 4
    assert np.abs(decoded[:, band:, 264:] - cached).mean() < 4


def test_labels_fit_and_bad_labels_are_refused():
    # A long label shrinks to fit a narrow clip rather than being cut off at its edges.
    band = label_band("FirstBlockCache", 64, 20)
    light = band.mean(axis=-1) > 128
    assert light.any() and not light[:, 0].any() and not light[:, -1].any()
    a = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="one string per clip"):
        side_by_side(a, a, labels=["only one"])
    with pytest.raises(ValueError, match="one string per clip"):
        side_by_side(a, a, labels=["uncached", 3])


def test_probe_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "none.mp4")
