"""Fidelity of a cached video against the uncached one: PSNR, SSIM, optional LPIPS.

Conventions (shared by every function here):

* Inputs are videos shaped (T, H, W, 3) (a single (H, W, 3) frame is treated as
  T = 1), as numpy arrays or torch tensors. Float input is taken as [0, 1];
  uint8 input is divided by 255. Compare the float frames the pipeline returned,
  before H.264 encoding, so codec noise is not blamed on the cache.
* Each metric is computed per frame and averaged over all frames.
* Work happens in torch on ``device`` (default: the device of a tensor input,
  else CPU) in chunks of frames, so an 81x480x832 video needs a few hundred MB
  rather than several GB.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch

__all__ = ["psnr", "ssim", "lpips", "compare_videos", "lpips_available"]

# Values per input chunk (~4M floats = 16 MB); SSIM holds ~15 such maps at once.
_CHUNK_ELEMENTS = 1 << 22

_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_SSIM_SIGMA = 1.5
_SSIM_WIN = 11  # = 2 * int(3.5 * sigma + 0.5) + 1, scikit-image's window for sigma 1.5


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(x)


def _prepare(a: Any, b: Any, device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    ta, tb = _to_tensor(a), _to_tensor(b)
    if tuple(ta.shape) != tuple(tb.shape):
        raise ValueError(f"videos differ in shape: a {tuple(ta.shape)} vs b {tuple(tb.shape)}")
    if ta.ndim == 3:
        ta, tb = ta.unsqueeze(0), tb.unsqueeze(0)
    if ta.ndim != 4 or ta.shape[-1] != 3:
        raise ValueError(f"videos must be shaped (T, H, W, 3) or (H, W, 3); got {tuple(ta.shape)}")
    if ta.shape[0] == 0:
        raise ValueError("videos have no frames")
    for name, t in (("a", ta), ("b", tb)):
        if t.dtype != torch.uint8 and not t.is_floating_point():
            raise TypeError(f"{name} must be float in [0, 1] or uint8, got {t.dtype}")
    if device is None:
        device = ta.device if isinstance(a, torch.Tensor) else (tb.device if isinstance(b, torch.Tensor) else "cpu")
    return ta, tb, torch.device(device)


def _chunk_size(shape: tuple[int, ...]) -> int:
    per_frame = max(1, shape[1] * shape[2] * shape[3])
    return max(1, _CHUNK_ELEMENTS // per_frame)


def _as_unit_float(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.to(device=device, dtype=dtype) / 255.0
    return t.to(device=device, dtype=dtype)


def _hi_precision(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def psnr(a: Any, b: Any, *, device: str | torch.device | None = None) -> float:
    """Mean per-frame PSNR in dB with data range 1.

    Identical frames have no finite PSNR: they are left out of the mean, so the
    result is the mean over frames that differ; if every frame is identical the
    result is ``float('inf')``. (A float('inf') is not valid JSON; callers that
    serialise it should map it to a string or null.)
    """
    ta, tb, dev = _prepare(a, b, device)
    dtype = _hi_precision(dev)
    values: list[float] = []
    step = _chunk_size(tuple(ta.shape))
    for i in range(0, ta.shape[0], step):
        xa = _as_unit_float(ta[i : i + step], dev, dtype)
        xb = _as_unit_float(tb[i : i + step], dev, dtype)
        mse = (xa - xb).pow(2).mean(dim=(1, 2, 3))
        values.extend(float(m) for m in mse.cpu())
    finite = [-10.0 * math.log10(m) for m in values if m > 0]
    if not finite:
        return float("inf")
    return float(sum(finite) / len(finite))


@functools.lru_cache(maxsize=8)
def _gauss_1d(device_str: str, dtype: torch.dtype) -> torch.Tensor:
    r = _SSIM_WIN // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return (g / g.sum()).to(device=device_str, dtype=dtype)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, 'valid' only: scikit-image crops (win-1)/2 pixels per
    # border before averaging, which is exactly the valid region.
    c = x.shape[1]
    kh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    x = torch.nn.functional.conv2d(x, kh, groups=c)
    return torch.nn.functional.conv2d(x, kw, groups=c)


def ssim(
    a: Any,
    b: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean per-frame SSIM, data range 1.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
    covariances, computed per RGB channel and averaged: the same definition as
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=-1)``. Frames must
    be at least 11x11.
    """
    ta, tb, dev = _prepare(a, b, device)
    h, w = ta.shape[1], ta.shape[2]
    if h < _SSIM_WIN or w < _SSIM_WIN:
        raise ValueError(f"SSIM needs frames of at least {_SSIM_WIN}x{_SSIM_WIN}; got {h}x{w}")
    g = _gauss_1d(str(dev), dtype)
    c1 = (_SSIM_K1 * 1.0) ** 2
    c2 = (_SSIM_K2 * 1.0) ** 2
    total, count = 0.0, 0
    step = _chunk_size(tuple(ta.shape))
    for i in range(0, ta.shape[0], step):
        x = _as_unit_float(ta[i : i + step], dev, dtype).permute(0, 3, 1, 2)
        y = _as_unit_float(tb[i : i + step], dev, dtype).permute(0, 3, 1, 2)
        mx, my = _blur(x, g), _blur(y, g)
        vx = _blur(x * x, g) - mx * mx
        vy = _blur(y * y, g) - my * my
        cxy = _blur(x * y, g) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        # Every frame has the same valid area, so the mean of frame means is the
        # mean over all values; sum in float64 to keep long videos exact.
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    return total / count


def _lpips_weights_present() -> bool:
    # torchvision caches the ImageNet AlexNet backbone here; without it, lpips
    # would download ~233 MB on first use, which this project never does.
    import glob
    import os

    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    return bool(glob.glob(os.path.join(ckpt_dir, "alexnet-owt-*.pth")))


def lpips_available() -> bool:
    """True when the ``lpips`` package, torchvision and the AlexNet weights are all local."""
    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        return False
    return _lpips_weights_present()


@functools.lru_cache(maxsize=2)
def _lpips_model(device_str: str):
    import lpips as lpips_pkg  # optional dependency

    model = lpips_pkg.LPIPS(net="alex", verbose=False)
    return model.eval().to(device_str)


def lpips(a: Any, b: Any, *, device: str | torch.device | None = None) -> float | None:
    """Mean per-frame LPIPS (AlexNet), or None when it cannot run offline.

    Needs the ``lpips`` package and locally cached weights (see ``lpips_available``);
    nothing is ever downloaded. Lower is better.
    """
    ta, tb, dev = _prepare(a, b, device)
    if not lpips_available():
        return None
    model = _lpips_model(str(dev))
    total, n = 0.0, 0
    # AlexNet activations are far larger than the input; use smaller chunks.
    step = max(1, _chunk_size(tuple(ta.shape)) // 4)
    with torch.no_grad():
        for i in range(0, ta.shape[0], step):
            x = _as_unit_float(ta[i : i + step], dev, torch.float32).permute(0, 3, 1, 2) * 2 - 1
            y = _as_unit_float(tb[i : i + step], dev, torch.float32).permute(0, 3, 1, 2) * 2 - 1
            d = model(x, y).flatten()
            total += float(d.sum(dtype=torch.float64))
            n += d.numel()
    return total / n


def compare_videos(a: Any, b: Any, *, device: str | torch.device | None = None) -> dict:
    """``{"psnr": float, "ssim": float, "lpips": float | None}`` for two videos
    (e.g. cached vs uncached float frames). See the module doc for conventions."""
    _prepare(a, b, device)  # fail fast on shape/dtype before any metric runs
    return {
        "psnr": psnr(a, b, device=device),
        "ssim": ssim(a, b, device=device),
        "lpips": lpips(a, b, device=device),
    }
