"""PSNR / SSIM / LPIPS against constructed inputs and an independent SSIM reference."""

import math

import numpy as np
import pytest
import torch

from bwcache import metrics
from bwcache.metrics import compare_videos, lpips, psnr, ssim


def reference_ssim(a, b):
    """Direct SSIM: explicit 11x11 Gaussian window at every valid position, per
    channel, population statistics, K1=0.01, K2=0.03, data range 1 (the definition
    scikit-image uses with gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False), averaged over channels and frames."""
    r = np.arange(-5, 6)
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    t, h, w, ch = a.shape
    for f in range(t):
        for c in range(ch):
            x, y = a[f, :, :, c], b[f, :, :, c]
            for i in range(h - 10):
                for j in range(w - 10):
                    px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                    mx, my = (win * px).sum(), (win * py).sum()
                    vx = (win * (px - mx) ** 2).sum()
                    vy = (win * (py - my) ** 2).sum()
                    cxy = (win * (px - mx) * (py - my)).sum()
                    vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def noisy_pair(shape, sigma, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + sigma * rng.standard_normal(shape), 0, 1)
    return a, b


def test_psnr_uniform_error_is_exact():
    a = np.full((3, 16, 16, 3), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)
    assert psnr(a, a - 0.01) == pytest.approx(40.0, abs=1e-9)


def test_psnr_is_mean_of_frame_values():
    a = np.zeros((2, 8, 8, 3))
    b = a.copy()
    b[0] += 0.1  # 20 dB
    b[1] += 0.01  # 40 dB
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-9)


def test_psnr_identical_is_inf_and_identical_frames_are_skipped():
    a, _ = noisy_pair((2, 8, 8, 3), 0.0)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[1] = a[1] + 0.1
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)  # the identical frame adds no infinity


def test_psnr_uint8_and_torch_inputs():
    a = np.full((1, 4, 4, 3), 100, np.uint8)
    b = np.full((1, 4, 4, 3), 110, np.uint8)
    expected = 10 * math.log10(1 / (10 / 255) ** 2)
    assert psnr(a, b) == pytest.approx(expected)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)
    assert psnr(a[0], b[0]) == pytest.approx(expected)  # single (H, W, 3) frame


def test_ssim_identical_is_one_and_symmetric():
    a, b = noisy_pair((2, 24, 20, 3), 0.1)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-7)
    assert 0 < ssim(a, b) < 1


@pytest.mark.parametrize("shape,sigma", [((2, 16, 16, 3), 0.1), ((1, 13, 19, 3), 0.3), ((1, 20, 14, 3), 0.02)])
def test_ssim_matches_reference(shape, sigma):
    a, b = noisy_pair(shape, sigma, seed=sum(shape))
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-5)
    assert ssim(a, b, dtype=torch.float64) == pytest.approx(reference_ssim(a, b), abs=1e-10)


def test_ssim_matches_reference_on_smooth_frames():
    y, x = np.mgrid[0:18, 0:22] / 9.0
    a = np.stack([np.stack([np.sin(x + t), np.cos(2 * y), np.sin(x * y)], -1) * 0.4 + 0.5 for t in range(2)])
    b = np.clip(a + 0.03 * np.random.default_rng(1).standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-5)


def test_chunking_does_not_change_results(monkeypatch):
    a, b = noisy_pair((5, 16, 16, 3), 0.05, seed=3)
    whole = (psnr(a, b), ssim(a, b))
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 16 * 16 * 3 * 2)  # 2 frames per chunk
    assert psnr(a, b) == pytest.approx(whole[0], abs=1e-12)
    assert ssim(a, b) == pytest.approx(whole[1], abs=1e-7)


def test_shape_mismatch_names_both_shapes():
    a = np.zeros((2, 16, 16, 3))
    b = np.zeros((2, 16, 18, 3))
    for fn in (psnr, ssim, compare_videos):
        with pytest.raises(ValueError, match=r"\(2, 16, 16, 3\).*\(2, 16, 18, 3\)"):
            fn(a, b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError):
        psnr(np.zeros((1, 8, 8, 4)), np.zeros((1, 8, 8, 4)))


def test_compare_videos_keys_and_lpips_offline():
    a, b = noisy_pair((2, 16, 16, 3), 0.05)
    out = compare_videos(a, b)
    assert set(out) == {"psnr", "ssim", "lpips"}
    assert out["psnr"] == pytest.approx(psnr(a, b)) and out["ssim"] == pytest.approx(ssim(a, b))
    if not metrics.lpips_available():
        assert out["lpips"] is None and lpips(a, b) is None
    else:
        assert out["lpips"] >= 0


def test_lpips_none_without_local_weights(monkeypatch):
    monkeypatch.setattr(metrics, "_lpips_weights_present", lambda: False)
    a, b = noisy_pair((1, 16, 16, 3), 0.05)
    assert lpips(a, b) is None
