"""From a preset to a ready pipeline, and from request settings to that pipeline's call arguments."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .presets import Preset

# Pipelines whose `__call__` names an argument differently from the common video-pipeline spelling.
# `fps` is passed only to pipelines that condition on it.
CALL_ARGUMENT_NAMES = {
    "LattePipeline": {"num_frames": "video_length"},
    "LTXPipeline": {"fps": "frame_rate"},
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PipelineUnavailable(RuntimeError):
    """The weights of a preset's model cannot be had on this machine."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def local_weights(preset: Preset) -> Path | None:
    """A local copy of the preset's weights under `$BWCACHE_MODEL_DIR/<preset name>`, if there is one."""
    root = os.environ.get("BWCACHE_MODEL_DIR")
    if root and (Path(root) / preset.name).is_dir():
        return Path(root) / preset.name
    return None


def load_pipeline(preset: Preset, device: str | None = None):
    """Build the preset's pipeline on `device` (default: CUDA when available), progress bars off."""
    device = device or default_device()
    if preset.kind == "tiny":
        from . import tiny

        pipe = tiny.load_pipeline(device=device, dtype=DTYPES[preset.dtype])
    else:
        pipe = _load_diffusers(preset, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_diffusers(preset: Preset, device: str):
    import diffusers

    pipeline_class = getattr(diffusers, preset.pipeline_class, None)
    if pipeline_class is None:
        raise PipelineUnavailable(f"diffusers {diffusers.__version__} has no {preset.pipeline_class}.")
    if torch.device(device).type == "cpu" and preset.kind != "tiny":
        raise PipelineUnavailable(
            f"{preset.label} needs a GPU (about {preset.recommended_gpu_memory_gb} GB); none is available here. "
            "The Tiny Shapes preset runs on a CPU."
        )
    source = local_weights(preset) or preset.hub_id
    try:
        pipe = pipeline_class.from_pretrained(str(source), torch_dtype=DTYPES[preset.dtype])
    except (OSError, ValueError, ImportError) as error:
        raise PipelineUnavailable(
            f"The weights of {preset.label} ({preset.hub_id}) could not be loaded: {_first_line(error)} "
            f"Download them on a machine with internet (`hf download {preset.hub_id}`), or put a copy in "
            f"$BWCACHE_MODEL_DIR/{preset.name}."
        ) from error
    return pipe.to(device)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if line.endswith(".") else line + "."


_loaded: dict[tuple[str, str], object] = {}


def get_pipeline(preset: Preset, device: str | None = None):
    """The preset's pipeline, loaded once; one pipeline is kept per device, so switching presets frees the last one
    on that device (a CPU preset leaves the GPU's loaded)."""
    key = (preset.name, device or default_device())
    if key not in _loaded:
        for other in [k for k in _loaded if k[1] == key[1]]:
            del _loaded[other]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _loaded[key] = load_pipeline(preset, key[1])
    return _loaded[key]


def call_kwargs(preset: Preset, settings: dict) -> dict:
    """The pipeline's keyword arguments for request settings (prompt, sizes, frames, steps, guidance)."""
    names = CALL_ARGUMENT_NAMES.get(preset.pipeline_class or "", {})
    keys = ["prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale"]
    if "fps" in names:
        keys.append("fps")
    return {names.get(key, key): settings[key] for key in keys if settings.get(key) is not None}
