"""From a preset to a ready pipeline, and from request settings to that pipeline's call arguments.

A preset's checkpoint loads as its `dtype` and `loading` section say (`bwcache.presets`). `loading_plan` turns them
into data: the `from_pretrained` keyword arguments (one dtype, or one per component, passed to `from_pretrained` so
that the modules a model keeps in float32, its `_keep_in_fp32_modules`, stay so: the pipeline is never cast whole
afterwards) and the steps after loading (VAE tiling, model CPU offload or `.to(device)`, the scheduler's shift per
video size). `build_pipeline` carries a plan out; `load_pipeline` and `get_pipeline` do both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

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


@dataclass(frozen=True)
class LoadingPlan:
    """How a preset's diffusers pipeline is loaded, as data."""

    pipeline_class: str
    source: str  # the hub id, or the local copy under $BWCACHE_MODEL_DIR
    device: str
    # Keyword arguments of `from_pretrained`: `dtype`, one torch dtype or {component: dtype, "default": dtype}.
    from_pretrained: Mapping[str, Any] = field(hash=False)
    # The scheduler's shift: one number, {size class: number} (chosen per call by the video's size), or None.
    flow_shift: Any = field(default=None, hash=False)
    vae_tiling: bool = False
    cpu_offload: str | None = None  # "model": `enable_model_cpu_offload` instead of `.to(device)`
    default_size: tuple[int, int] = (0, 0)  # (height, width) a call that names no size gets the shift of

    def dtype_of(self, component: str) -> torch.dtype:
        """The dtype `from_pretrained` loads `component` in."""
        dtype = self.from_pretrained["dtype"]
        return dtype.get(component, dtype["default"]) if isinstance(dtype, Mapping) else dtype

    def steps(self) -> list[str]:
        """What happens after `from_pretrained`, in order, as text."""
        steps = []
        if isinstance(self.flow_shift, Mapping):
            steps.append(f"scheduler shift {_shift_text(self.flow_shift)}, rebuilt from its config for each call's size")
        elif self.flow_shift is not None:
            steps.append(f"scheduler shift {_shift_text(self.flow_shift)}, rebuilt from its config")
        if self.vae_tiling:
            steps.append("pipe.vae.enable_tiling()")
        steps.append(f"pipe.enable_model_cpu_offload(device={self.device!r})" if self.cpu_offload == "model"
                     else f"pipe.to({self.device!r})")
        return steps


def _shift_text(shift) -> str:
    if isinstance(shift, Mapping):
        return ", ".join(f"{value:g} at {size}" for size, value in shift.items())
    return f"{shift:g}"


def loading_plan(preset: Preset, device: str) -> LoadingPlan:
    """The plan to load `preset`'s pipeline on `device` (its local copy when `$BWCACHE_MODEL_DIR` has one)."""
    loading = preset.loading
    default = DTYPES[preset.dtype]
    components = {name: DTYPES[dtype] for name, dtype in loading.get("component_dtypes", {}).items()}
    dtype = {"default": default, **components} if components else default
    shift = loading.get("flow_shift")
    return LoadingPlan(
        pipeline_class=preset.pipeline_class,
        source=str(local_weights(preset) or preset.hub_id),
        device=str(device),
        from_pretrained={"dtype": dtype},
        flow_shift=dict(shift) if isinstance(shift, Mapping) else shift,
        vae_tiling=bool(loading.get("vae_tiling", False)),
        cpu_offload=loading.get("cpu_offload"),
        default_size=(preset.defaults["height"], preset.defaults["width"]),
    )


def build_pipeline(plan: LoadingPlan, preset: Preset | None = None):
    """Carry out a loading plan: `from_pretrained`, then the steps after it. `preset` names the model in errors."""
    import diffusers

    pipeline_class = getattr(diffusers, plan.pipeline_class, None)
    if pipeline_class is None:
        raise PipelineUnavailable(f"diffusers {diffusers.__version__} has no {plan.pipeline_class}.")
    try:
        pipe = pipeline_class.from_pretrained(plan.source, **plan.from_pretrained)
    except (OSError, ValueError, ImportError) as error:
        if preset is None:
            raise
        raise PipelineUnavailable(
            f"The weights of {preset.label} ({preset.hub_id}) could not be loaded: {_first_line(error)} "
            f"Download them on a machine with internet (`hf download {preset.hub_id}`), or put a copy in "
            f"$BWCACHE_MODEL_DIR/{preset.name}."
        ) from error
    if plan.flow_shift is not None:
        # The default size's shift now (a scheduler that takes none fails here, not at the first call).
        set_flow_shift(pipe, flow_shift_for(plan.flow_shift, None, None, plan.default_size))
    if plan.vae_tiling:
        pipe.vae.enable_tiling()
    if plan.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    return pipe


# ----------------------------------------------------------------------------- the scheduler's shift per size


def _shift_key(scheduler) -> str:
    """The scheduler's config key for the flow-matching shift: UniPC's `flow_shift` (with flow sigmas), the flow
    matching Euler scheduler's `shift` (without dynamic shifting)."""
    config = scheduler.config
    if "flow_shift" in config and config.get("use_flow_sigmas"):
        return "flow_shift"
    if "shift" in config and not config.get("use_dynamic_shifting"):
        return "shift"
    raise ValueError(f"{type(scheduler).__name__} takes no fixed flow shift; the preset's loading.flow_shift cannot "
                     "apply to it.")


def set_flow_shift(pipe, shift: float) -> None:
    """Give the pipeline's scheduler `shift`, rebuilding it from its config when it has another (as diffusers' Wan
    docs do: `UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=...)`)."""
    key = _shift_key(pipe.scheduler)
    if pipe.scheduler.config.get(key) != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **{key: shift})


def flow_shift_for(shift, height: int | None, width: int | None, default_size: tuple[int, int]) -> float:
    """The shift a call of `height` × `width` gets from a plan's `flow_shift` (either left out: `default_size`)."""
    if not isinstance(shift, Mapping):
        return shift
    from .presets import size_class

    height = height if height is not None else default_size[0]
    width = width if width is not None else default_size[1]
    return shift[size_class(height, width, tuple(shift))]


def prepare_call(pipe, preset: Preset, settings: dict) -> dict:
    """Ready `pipe` for one call with request `settings` and return the call's keyword arguments: a preset that
    sets `loading.flow_shift` gets the scheduler's shift for the request's size first."""
    shift = preset.loading.get("flow_shift")
    if shift is not None:
        default_size = (preset.defaults["height"], preset.defaults["width"])
        set_flow_shift(pipe, flow_shift_for(shift, settings.get("height"), settings.get("width"), default_size))
    return call_kwargs(preset, settings)


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

    if getattr(diffusers, preset.pipeline_class, None) is None:
        raise PipelineUnavailable(f"diffusers {diffusers.__version__} has no {preset.pipeline_class}.")
    if torch.device(device).type == "cpu":
        raise PipelineUnavailable(
            f"{preset.label} needs a GPU (about {preset.recommended_gpu_memory_gb} GB); none is available here. "
            "The Tiny Shapes preset runs on a CPU."
        )
    return build_pipeline(loading_plan(preset, device), preset)


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
    """The pipeline's keyword arguments for request settings (prompt, sizes, frames, steps, guidance), with the
    preset's extra call arguments (`loading.call_defaults`, e.g. Wan2.2-A14B's `guidance_scale_2`), which settings
    of the same name change."""
    names = CALL_ARGUMENT_NAMES.get(preset.pipeline_class or "", {})
    keys = ["prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale"]
    if "fps" in names:
        keys.append("fps")
    kwargs = {names.get(key, key): settings[key] for key in keys if settings.get(key) is not None}
    if settings.get("image") is not None:
        kwargs["image"] = settings["image"]
    for key, value in preset.call_defaults().items():
        kwargs[key] = settings[key] if settings.get(key) is not None else value
    return kwargs
