"""The caches users would pick instead of BWCache — diffusers' own — configured properly for the pipeline at hand.

Each peer is enabled through `transformer.enable_cache(config)` and removed with `disable_cache()`, exactly as a
diffusers user would. "Properly" means: MagCache gets ratios from its own calibration run on the same prompt and step
count; TaylorSeer gets identifiers that match the model's actual attention and feed-forward modules (its defaults
miss Wan's `attn1`/`attn2`); SeaCache gets the step index, sigma and step count it needs from the pipeline's cache
context, and is shown the noisy latents where conditioning channels follow them; PAB is refused where its single
per-layer counter would mix the cond and uncond passes of a pipeline that runs CFG as two separate calls.

cache-dit's DBCache, alone and with its TaylorSeer calibrator (`bwcache.cachedit`), is listed only where cache-dit is
installed; asking for it elsewhere says how to install it.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import torch
from diffusers import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
)
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention

from . import cachedit
from .blocks import find_blocks

METHODS = {
    "fbc": "FirstBlockCache",
    "magcache": "MagCache",
    "taylorseer": "TaylorSeer",
    "seacache": "SeaCache",
    "pab": "Pyramid Attention Broadcast",
}
if cachedit.installed():
    METHODS.update(cachedit.METHODS)
# Peers known here whose package is missing: why each cannot be chosen.
UNAVAILABLE = {} if cachedit.installed() else {key: cachedit.not_installed_message(key) for key in cachedit.METHODS}

# Defaults per method; any of them can be overridden per call.
DEFAULT_PARAMS = {
    "fbc": {"threshold": 0.1},
    "magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 3, "max_order": 1},
    "seacache": {"threshold": 0.25, "max_consecutive_cached": 2},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
    **cachedit.DEFAULT_PARAMS,
}

# Pipelines that run the cond and uncond passes as two separate transformer calls.
SEQUENTIAL_CFG_PIPELINES = {"WanPipeline", "SkyReelsV2Pipeline", "HunyuanVideoPipeline", "TinyShapesPipeline"}


@dataclass
class PeerRun:
    """A peer enabled on a pipeline: call `remove()` when done."""

    method: str
    pipe: object
    config: object
    _handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.pipe.transformer.disable_cache()


def check_method(method: str) -> None:
    if method in UNAVAILABLE:
        raise ValueError(UNAVAILABLE[method])
    if method not in METHODS:
        raise ValueError(f"Unknown cache method {method!r}; choose one of {', '.join(METHODS)}.")


def applicability(method: str, pipe, settings: dict) -> str | None:
    """Why `method` cannot be compared fairly on this pipeline and settings, or None when it can."""
    check_method(method)
    if method in cachedit.METHODS:
        return cachedit.applicability(pipe)
    sequential_cfg = any(cls.__name__ in SEQUENTIAL_CFG_PIPELINES for cls in type(pipe).__mro__)
    if method == "pab" and sequential_cfg and settings["guidance_scale"] > 1:
        return (
            "Pyramid Attention Broadcast keeps one counter per attention layer, so with CFG run as separate cond and "
            f"uncond calls ({type(pipe).__name__}) the uncond pass would reuse the cond pass's attention."
        )
    return None


def model_identifiers(transformer: torch.nn.Module) -> list[str]:
    """Exact-match patterns for every attention and feed-forward module inside the transformer's DiT blocks."""
    prefixes = tuple(spec.name + "." for spec in find_blocks(transformer))
    names = [
        name
        for name, module in transformer.named_modules()
        if name.startswith(prefixes) and isinstance(module, (Attention, AttentionModuleMixin, FeedForward))
    ]
    return [f"^{re.escape(name)}$" for name in names]


def calibrate_magcache(pipe, run, num_steps: int) -> list[float]:
    """MagCache's own calibration run: the per-step residual magnitude ratios, averaged over CFG branches."""
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    ratios: dict[str, list[float]] = {}
    try:
        # The tail block's hook computes each ratio, prints the list and clears it: record them as they come.
        hook = _find_hook(pipe.transformer, "MagCacheBlockHook", is_tail=True)
        record = hook._perform_calibration_step

        def recording(state, residual):
            record(state, residual)
            ratios.setdefault(hook.state_manager._context.name, []).append(state.calibration_ratios[-1])

        hook._perform_calibration_step = recording
        with contextlib.redirect_stdout(io.StringIO()):
            run()
    finally:
        pipe.transformer.disable_cache()
    series = [r for r in ratios.values() if len(r) == num_steps]
    if not series:
        raise RuntimeError("MagCache calibration recorded no complete run.")
    return [sum(values) / len(values) for values in zip(*series)]


def _find_hook(module: torch.nn.Module, class_name: str, **attributes):
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            if type(hook).__name__ == class_name and all(getattr(hook, k, None) == v for k, v in attributes.items()):
                return hook
    raise RuntimeError(f"No {class_name} found on {type(module).__name__}.")


def build_config(method: str, pipe, settings: dict, params: dict | None = None, mag_ratios=None):
    """The diffusers cache config of `method` for this pipeline and settings (cache-dit's for its methods)."""
    check_method(method)
    if method in cachedit.METHODS:
        return cachedit.build_config(method, pipe, settings, params)
    params = {**DEFAULT_PARAMS[method], **(params or {})}
    steps = settings["num_inference_steps"]
    if method == "fbc":
        return FirstBlockCacheConfig(**params)
    if method == "magcache":
        if mag_ratios is None:
            raise ValueError("MagCache needs mag_ratios from calibrate_magcache().")
        return MagCacheConfig(num_inference_steps=steps, mag_ratios=list(mag_ratios), **params)
    if method == "taylorseer":
        return TaylorSeerCacheConfig(cache_identifiers=model_identifiers(pipe.transformer), **params)
    if method == "seacache":
        callback = _noisy_latents_callback(pipe.transformer)
        if callback is not None and "raw_vision_callback" not in params:
            params["raw_vision_callback"] = callback
        return SeaCacheConfig(**params)
    return PyramidAttentionBroadcastConfig(**params)


def _noisy_latents_callback(transformer):
    """SeaCache's filter reads the noisy latents. It finds them itself on a Wan text-to-video model; where conditioning
    channels are concatenated after them (in_channels > out_channels, as Wan's image-to-video model does), it needs
    to be told that they are the first out_channels channels of `hidden_states`."""
    config = getattr(transformer, "config", None)
    in_channels, out_channels = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
    if not (isinstance(in_channels, int) and isinstance(out_channels, int) and in_channels > out_channels):
        return None

    def noisy_latents(module, args, kwargs):
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
            return None
        return list(hidden_states[:, :out_channels].unbind(dim=0))

    return noisy_latents


def enable_peer(method: str, pipe, settings: dict, params: dict | None = None, mag_ratios=None):
    """Enable `method` on the pipeline; the returned run's `remove()` leaves the pipeline as it was."""
    reason = applicability(method, pipe, settings)
    if reason:
        raise ValueError(reason)
    if method in cachedit.METHODS:
        return cachedit.enable(method, pipe, settings, params)
    config = build_config(method, pipe, settings, params, mag_ratios)
    handles = []
    if method == "pab":
        # PAB asks for the current timestep through a callback; read it off the transformer's own input.
        current = {"t": 1000}

        def remember(module, args, kwargs):
            t = kwargs.get("timestep")
            if isinstance(t, torch.Tensor) and t.numel():
                current["t"] = int(t.flatten()[0])

        handles.append(pipe.transformer.register_forward_pre_hook(remember, with_kwargs=True))
        config.current_timestep_callback = lambda: current["t"]
    pipe.transformer.enable_cache(config)
    return PeerRun(method, pipe, config, handles)
