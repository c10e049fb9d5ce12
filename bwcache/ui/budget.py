"""What a request costs on a GPU: the seconds ZeroGPU is asked for, and what to say when memory runs out."""

from __future__ import annotations

from typing import Any, Mapping

from ..presets import Preset

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


# Measured seconds per denoising step (CFG: both passes) of a model at a video size, by hub id:
# (seconds, frames, height, width, the VAE's temporal compression). Wan2.1-T2V-1.3B: 5 s of 480P video (81 frames,
# 50 steps) in about 4 minutes on an RTX 4090 (Wan2.1's model card), 4.8 s per step.
GPU_SECONDS_PER_STEP = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": (4.8, 81, 480, 832, 4),
}
# The least share of the measured step time any request costs per step (embedding, norms, launches).
GPU_STEP_FLOOR = 0.1
# What a ZeroGPU call spends besides the denoising steps: text encoding, VAE decoding, moving tensors (seconds).
GPU_OVERHEAD_SECONDS = 20


def gpu_seconds(preset: Preset, settings: Mapping[str, Any], runs: int = 3) -> int:
    """The GPU time of one comparison (`runs` generations: warm-up, uncached, cached, …), for ZeroGPU's `duration`.

    Calibrated presets (`GPU_SECONDS_PER_STEP`) scale their measured seconds per step to the request's token count
    (latent frames × pixels), half the step's time linear in the tokens and half quadratic (attention), at least
    `GPU_STEP_FLOOR` of it, with a 20% margin, and count every step as uncached; the model is loaded at start-up,
    outside this time. Other presets get a generous estimate from their memory size.
    """
    d = preset.defaults
    calibrated = GPU_SECONDS_PER_STEP.get(preset.hub_id)
    if calibrated is not None:
        seconds, frames, height, width, temporal = calibrated

        def tokens(f, h, w):
            return ((f - 1) // temporal + 1) * h * w

        ratio = tokens(settings["num_frames"], settings["height"], settings["width"]) / tokens(frames, height, width)
        per_step = seconds * max(GPU_STEP_FLOOR, 0.5 * ratio + 0.5 * ratio * ratio)
        estimate = GPU_OVERHEAD_SECONDS + runs * settings["num_inference_steps"] * per_step * 1.2
        return int(min(1800, max(30, estimate)))
    work = (
        settings["num_inference_steps"] / d["num_inference_steps"]
        * settings["num_frames"] / d["num_frames"]
        * settings["height"] * settings["width"] / (d["height"] * d["width"])
    )
    per_run_at_default = 4.0 + 1.2 * (preset.recommended_gpu_memory_gb or 0)
    return int(min(600, max(30, 20 + runs * per_run_at_default * work)))
