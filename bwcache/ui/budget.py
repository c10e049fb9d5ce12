"""What a request costs on a GPU: the seconds ZeroGPU is asked for, whether they fit its per-call limit, and what
to say when memory runs out.

The GPU time of a request is derived, not measured: its FLOPs over a stated sustained throughput of the Space's
hardware. ZeroGPU (`zero-a10g`) lends half an RTX Pro 6000 Blackwell: about 250 TFLOP/s of dense bf16 peak; this
module assumes half of that sustained, `SUSTAINED_BF16_FLOPS` = 125 TFLOP/s (an RTX 4090 doing Wan2.1-1.3B's 81
frames at 480P in 4.8 s per step, as its model card reports, sustains 118 of its 165). The Wan VAE decodes in float32
(TF32 convolutions), assumed to sustain `SUSTAINED_VAE_FLOPS` = 30 TFLOP/s. A denoising step of a Wan transformer
costs, per pass (two with CFG) and block, 12·d² + 4·d·ffn FLOPs per token in its linear layers, 4·N·d per token in
self-attention over N tokens and 4·512·d in cross-attention over the 512 text tokens (within 0.1% of torch's FLOP
counter on the real 1.3B config); its VAE decodes at 8.6 MFLOPs per output pixel (Wan2.1's VAE; 19 for Wan2.2's),
from the same counter. Every generation of a comparison counts as uncached (the cached run's saving is not known
before it runs), with a 25% margin, plus a fixed cost per call (the GPU attached, the weights moved onto it, the
quality metrics) and per generation (text encoding). Presets without a FLOP model (no Wan transformer) get a rough
estimate from their memory size.

ZeroGPU multiplies the duration a call asks for by its hardware's `duration_factor` (1.5 on the half RTX Pro 6000,
1 on an H200 slice: `spaces.zero.config`) and refuses a call whose scaled duration is over the maximum (about 5
minutes: `ZEROGPU_CALL_LIMIT_SECONDS`). So a call asks for its estimate divided by the factor, and a request whose
estimate is over the limit is refused before any GPU is scheduled (`check_gpu_budget`), naming what would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..presets import Preset, frames_rule_ok


def oom_message(preset: Preset, settings: Mapping[str, Any]) -> str:
    need = preset.recommended_gpu_memory_gb
    hint = f" {preset.label} is meant for a GPU with about {need:g} GB." if need else ""
    return (
        f"The GPU ran out of memory generating {settings['num_frames']} frames at "
        f"{settings['width']}×{settings['height']}. Try fewer frames or a smaller size.{hint}"
    )


def needs_gpu(preset: Preset) -> bool:
    """Whether the preset's model runs on a GPU (the embedded Tiny Shapes runs on a CPU)."""
    return preset.kind != "tiny"


# ----------------------------------------------------------------------------- ZeroGPU

# The most seconds one ZeroGPU call may ask for, after ZeroGPU's hardware factor: 5 minutes ("5 minutes is the
# maximum time that can be requested at once", ZeroGPU's maintainers; a signed-in visitor's limit is 300 s, and more
# is answered "The requested GPU duration (…s) is larger than the maximum allowed"). Visitors who are not signed in
# have 2 minutes of GPU a day in all, so only calls under 120 s can run for them.
ZEROGPU_CALL_LIMIT_SECONDS = 300
UNAUTHENTICATED_DAILY_SECONDS = 120


def duration_factor() -> float:
    """What ZeroGPU multiplies a call's requested duration by on this machine's hardware (1 off ZeroGPU)."""
    try:
        from spaces.config import Config

        if not Config.zero_gpu:
            return 1.0
        import spaces.zero as zero
        from spaces.zero import config
    except Exception:  # noqa: BLE001 (no `spaces` package, or not its layout)
        return 1.0
    try:
        if zero.default_gpu_size() == "xlarge":  # the whole card: not scaled (and counted twice)
            return 1.0
        return float(config.get_config()["duration_factor"])
    except Exception:  # noqa: BLE001
        return 1.0


# ----------------------------------------------------------------------------- the FLOP model


@dataclass(frozen=True)
class WanShape:
    """What a Wan model's step and decode cost depends on: the transformer's blocks, width and FFN width, the VAE's
    compression (frames, height, width) and its decoder's FLOPs per output pixel, the patch size."""

    layers: int
    dim: int
    ffn: int
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    vae_flops_per_pixel: float = 8.6e6
    patch: tuple[int, int, int] = (1, 2, 2)
    text_tokens: int = 512
    text_dim: int = 4096

    def tokens(self, frames: int, height: int, width: int) -> int:
        t, h, w = self.vae_stride
        pt, ph, pw = self.patch
        return ((frames - 1) // t + 1) // pt * (height // h // ph) * (width // w // pw)

    def pass_flops(self, frames: int, height: int, width: int) -> float:
        """FLOPs of one transformer forward pass (2 per multiply-add)."""
        n, d = self.tokens(frames, height, width), self.dim
        per_token = 12 * d * d + 4 * d * self.ffn + 4 * n * d + 4 * self.text_tokens * d
        text = 4 * self.text_tokens * d * d  # cross-attention's keys and values of the text tokens
        embed = 2 * self.text_tokens * (self.text_dim * d + d * d)  # the text embedding's two layers
        return self.layers * (n * per_token + text) + embed

    def decode_flops(self, frames: int, height: int, width: int) -> float:
        return self.vae_flops_per_pixel * frames * height * width


# By hub id. Wan2.2-A14B runs one 14B expert per step, so its step costs what Wan2.1-14B's does.
WAN_SHAPES = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": WanShape(layers=30, dim=1536, ffn=8960),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": WanShape(layers=40, dim=5120, ffn=13824),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": WanShape(layers=40, dim=5120, ffn=13824),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": WanShape(layers=30, dim=3072, ffn=14336, vae_stride=(4, 16, 16),
                                                 vae_flops_per_pixel=19e6),
}
SUSTAINED_BF16_FLOPS = 125e12
SUSTAINED_VAE_FLOPS = 30e12
GPU_MARGIN = 1.25
# Seconds a ZeroGPU call costs besides its generations (the GPU attached, the weights moved onto it, quality
# metrics, frames back), and each generation besides its steps and decode (text encoding, set-up).
GPU_CALL_OVERHEAD_SECONDS = 15
GPU_RUN_OVERHEAD_SECONDS = 2


def step_seconds(preset: Preset, settings: Mapping[str, Any]) -> float | None:
    """Seconds of one uncached denoising step (both CFG passes) on the Space's GPU; None without a FLOP model."""
    shape = WAN_SHAPES.get(preset.hub_id)
    if shape is None:
        return None
    guidance = [settings.get("guidance_scale") or 1.0, settings.get("guidance_scale_2") or 1.0]
    passes = 2 if max(guidance) > 1 else 1
    return passes * shape.pass_flops(settings["num_frames"], settings["height"], settings["width"]) / SUSTAINED_BF16_FLOPS


def run_seconds(preset: Preset, settings: Mapping[str, Any]) -> float | None:
    """Seconds of one uncached generation (steps, VAE decode, text encoding); None without a FLOP model."""
    per_step = step_seconds(preset, settings)
    if per_step is None:
        return None
    shape = WAN_SHAPES[preset.hub_id]
    decode = shape.decode_flops(settings["num_frames"], settings["height"], settings["width"]) / SUSTAINED_VAE_FLOPS
    return settings["num_inference_steps"] * per_step + decode + GPU_RUN_OVERHEAD_SECONDS


def estimate_seconds(preset: Preset, settings: Mapping[str, Any], runs: int = 3) -> float:
    """The GPU seconds of one call of `runs` generations at these settings, margin included."""
    per_run = run_seconds(preset, settings)
    if per_run is not None:
        return GPU_CALL_OVERHEAD_SECONDS + GPU_MARGIN * runs * per_run
    # No FLOP model: the work relative to the preset's defaults, at a cost per default run from its memory size.
    d = preset.defaults
    work = (
        settings["num_inference_steps"] / d["num_inference_steps"]
        * settings["num_frames"] / d["num_frames"]
        * settings["height"] * settings["width"] / (d["height"] * d["width"])
    )
    per_run_at_default = 4.0 + 1.2 * (preset.recommended_gpu_memory_gb or 0)
    return 20 + runs * per_run_at_default * work


def gpu_seconds(preset: Preset, settings: Mapping[str, Any], runs: int = 3, factor: float | None = None) -> int:
    """The `duration` to ask ZeroGPU for a call of `runs` generations: the estimate divided by ZeroGPU's hardware
    factor (`duration_factor()` unless given), which ZeroGPU multiplies it by again."""
    factor = duration_factor() if factor is None else factor
    return max(1, math.ceil(estimate_seconds(preset, settings, runs) / factor))


def comparison_runs(compare_with: str | None = None) -> int:
    """Generations in a comparison: warm-up, uncached and cached, the peer cache's, and MagCache's calibration."""
    return 3 + (compare_with is not None) + (compare_with == "magcache")


def sweep_runs(thresholds) -> int:
    """Generations in a sweep: warm-up, uncached, and one per δ."""
    return 2 + len(thresholds)


def fits(preset: Preset, settings: Mapping[str, Any], runs: int, limit: float = ZEROGPU_CALL_LIMIT_SECONDS) -> bool:
    return estimate_seconds(preset, settings, runs) <= limit


def check_gpu_budget(preset: Preset, settings: Mapping[str, Any], runs: int = 3,
                     limit: float = ZEROGPU_CALL_LIMIT_SECONDS, sweep: bool = False) -> None:
    """Refuse (ValueError) a request whose GPU time is over ZeroGPU's per-call limit, naming the request, its
    estimate and what would fit: fewer frames, fewer steps (and for a sweep, fewer δ values)."""
    if not needs_gpu(preset) or fits(preset, settings, runs, limit):
        return
    frames, height, width, steps = (settings[k] for k in ("num_frames", "height", "width", "num_inference_steps"))
    what = f"A sweep of {runs - 2} δ values" if sweep else "A comparison"
    parts = [
        f"{what} of {frames} frames at {width}×{height} with {steps} steps needs about "
        f"{estimate_seconds(preset, settings, runs):.0f} s of GPU time ({runs} generations), more than the "
        f"{limit:g} s a ZeroGPU call may take."
    ]
    options = []
    most_frames = _most_frames(preset, settings, runs, limit)
    if most_frames is not None:
        options.append(f"up to {most_frames} frames (at {width}×{height}, {steps} steps)")
    most_steps = _most_steps(preset, settings, runs, limit)
    if most_steps is not None:
        options.append(f"up to {most_steps} steps ({frames} frames at {width}×{height})")
    if sweep:
        most_runs = max((r for r in range(3, runs) if fits(preset, settings, r, limit)), default=None)
        if most_runs is not None:
            options.append(f"up to {most_runs - 2} δ values (at these settings)")
    parts.append("What fits: " + "; or ".join(options) + "." if options else "Use a smaller size.")
    raise ValueError(" ".join(parts))


def _most_frames(preset, settings, runs, limit) -> int | None:
    lo, _, rule = preset.limits["num_frames"]
    for frames in range(settings["num_frames"] - 1, lo - 1, -1):
        if frames_rule_ok(frames, rule) and fits(preset, {**settings, "num_frames": frames}, runs, limit):
            return frames
    return None


def _most_steps(preset, settings, runs, limit) -> int | None:
    lo = preset.limits["num_inference_steps"][0]
    for steps in range(settings["num_inference_steps"] - 1, lo - 1, -1):
        if fits(preset, {**settings, "num_inference_steps": steps}, runs, limit):
            return steps
    return None
