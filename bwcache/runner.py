"""One prompt with and without BWCache, timed side by side in one process, with quality and traces.

`run_comparison` is what the app's Run button, the `compare` API endpoint and `python -m bwcache compare` call.
Order of work: a threshold-0 run (warm-up, and the uncached run's full distance map: bit-identical to an uncached
run), then the timed uncached run with no hooks at all, then the timed cached run. Same seed for all three.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

from . import __name__ as _package
from . import parallel, peers
from .config import BWCacheConfig
from .apply import cached
from .instruments import block_timer, synchronize
from .metrics import compare_videos
from .pipelines import call_kwargs, default_device, device_name, get_pipeline
from .presets import Preset, load_preset
from .resources import package_version
from .schedule import largest_decision_distance, schedule_for
from .trace import reuse_fraction

Progress = Callable[[float, str], None]
PEERS_UNDER_CONTEXT_PARALLEL = (
    "--compare-with cannot run under context parallelism: the peer caches decide on each process's own shard, so "
    "processes would disagree and wait on each other forever."
)
AUTO = "auto"

# Fields a request may set, with the preset's defaults filling the rest.
SETTING_KEYS = ("prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale")


@dataclass
class Comparison:
    """A finished comparison: the JSON-able run record plus both videos as frames (T, H, W, 3): float in [0, 1] (as
    `run_comparison` returns them) or uint8 (`as_uint8`)."""

    record: dict
    baseline_frames: np.ndarray = field(repr=False)
    bwcache_frames: np.ndarray = field(repr=False)
    peer_frames: np.ndarray | None = field(default=None, repr=False)

    def as_uint8(self) -> "Comparison":
        """The same comparison with uint8 frames: a quarter of the bytes, for crossing a process boundary (the
        quality figures are already in the record, computed on the float frames)."""
        from .video import to_uint8

        peer = None if self.peer_frames is None else to_uint8(self.peer_frames)
        return Comparison(self.record, to_uint8(self.baseline_frames), to_uint8(self.bwcache_frames), peer)


def resolve_preset(preset: str | Preset) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def resolve_settings(preset: Preset, **overrides) -> dict:
    """The preset's defaults with the given overrides, checked against the preset's limits."""
    settings = {key: preset.defaults.get(key) for key in SETTING_KEYS + ("fps", "seed")}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    if isinstance(settings["prompt"], str):
        settings["prompt"] = settings["prompt"].strip()
    preset.validate_request(**{key: settings[key] for key in SETTING_KEYS if key != "negative_prompt"})
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer from 0 to {2**32 - 1}, got {seed!r}.")
    settings["seed"] = int(seed)
    return settings


def resolve_config(preset: Preset, num_steps: int, profile: str | None = None, **overrides) -> BWCacheConfig:
    """The BWCache settings of one of the preset's profiles (its default when None) with overrides;
    `reuse_interval="auto"` means 10% of the steps."""
    values = preset.profile_settings(profile)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if values.get("reuse_interval") == AUTO:
        values["reuse_interval"] = None
    values["num_inference_steps"] = num_steps
    return BWCacheConfig(**values)


def _frames(output) -> np.ndarray:
    frames = output.frames[0]
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    return np.asarray(frames, dtype=np.float32)


def generate(pipe, preset: Preset, settings: dict, device: str, on_step: Callable[[int], None] | None = None):
    """One timed generation: returns (frames, seconds). The seed fixes the initial noise on the CPU for all devices."""
    kwargs = call_kwargs(preset, settings)
    generator = torch.Generator("cpu").manual_seed(settings["seed"])

    def callback(pipeline, step, timestep, callback_kwargs):
        if on_step is not None:
            on_step(step)
        return callback_kwargs

    synchronize(device)
    start = time.perf_counter()
    output = pipe(**kwargs, generator=generator, output_type="np", callback_on_step_end=callback)
    synchronize(device)
    return _frames(output), time.perf_counter() - start


class RunCancelled(Exception):
    """The run was cancelled (its `cancel` event set); it stopped at the end of a denoising step."""


class _Stages:
    """Progress over several generations of the same number of steps; a set `cancel` event stops the run at the
    end of the step under way."""

    def __init__(self, progress: Progress | None, names: list[str], steps: int, cancel=None):
        self.progress, self.names, self.steps, self.cancel = progress, names, steps, cancel

    def reporter(self, index: int) -> Callable[[int], None]:
        def report(step: int) -> None:
            if self.cancel is not None and self.cancel.is_set():
                raise RunCancelled(f"cancelled during {self.names[index]}, after step {step + 1}/{self.steps}")
            if self.progress is not None:
                done = index * self.steps + step + 1
                self.progress(done / (len(self.names) * self.steps), f"{self.names[index]}: step {step + 1}/{self.steps}")

        return report


def json_number(value: float | None) -> float | None:
    """JSON has no infinity or NaN: those become null (an infinite PSNR means identical videos)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _quality(baseline: np.ndarray, cached: np.ndarray, device: str) -> dict:
    metrics = compare_videos(baseline, cached, device=device)
    identical = bool(np.array_equal(baseline, cached))
    return {
        "psnr": json_number(metrics["psnr"]),
        "ssim": json_number(metrics["ssim"]),
        "lpips": json_number(metrics.get("lpips")),
        "identical": identical,
    }


def _traced_warmup(pipe, preset, settings, device, report, measure_blocks=True, indicator_feature="hidden_states"):
    """The threshold-0 run: warms up, records the full distance map (of the feature the cached run measures) and
    the share of time spent in DiT blocks."""
    # The timer goes on first, so it sits inside BWCache's block hooks: the cache's own work is not block time.
    timer = block_timer(pipe, device) if measure_blocks else None
    try:
        with cached(pipe, BWCacheConfig(threshold=0.0, indicator_feature=indicator_feature)) as handle:
            frames, seconds = generate(pipe, preset, settings, device, report)
    finally:
        if timer is not None:
            timer.remove()
    block_share = timer.seconds / seconds if timer is not None and seconds > 0 else None
    return handle.trace.to_dict(), frames, block_share


def ideal_speedup(reuse_fraction: float, block_share: float | None) -> float | None:
    """The speedup if skipping a share of block evaluations saved exactly that share of block time."""
    if block_share is None:
        return None
    return 1.0 / max(1e-9, 1.0 - reuse_fraction * min(1.0, block_share))


def run_comparison(
    preset: str | Preset = "tiny-shapes",
    prompt: str | None = None,
    seed: int | None = None,
    threshold: float | None = None,
    *,
    negative_prompt: str | None = None,
    profile: str | None = None,
    reuse_interval: int | str | None = None,
    tail_fraction: float | None = None,
    mode: str | None = None,
    indicator_blocks=None,
    indicator_feature: str | None = None,
    extrapolation: float | None = None,
    num_inference_steps: int | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    compare_with: str | None = None,
    device: str | None = None,
    pipe=None,
    progress: Progress | None = None,
    context_parallel: str | None = None,
    cancel=None,
) -> Comparison:
    """Run `prompt` without and with BWCache on the preset's model and return the run record and both videos.

    Arguments left as `None` take the preset's defaults; the cache settings come from the preset's `profile`
    (`preset.profile_names`; its default when None), with any cache argument given changing it. `compare_with` names a peer cache (`bwcache.peers.METHODS`)
    to run on the same prompt and seed as well. `pipe` may pass an already built pipeline of the preset's class
    (tests use tiny random components); otherwise the preset's pipeline is loaded (once) on `device`.
    `context_parallel` (one of `bwcache.parallel.KINDS`) shards the denoisers over all processes of an initialised
    `torch.distributed` group (`bwcache.parallel.init_distributed()`); every process calls this function.
    `cancel` (a `threading.Event`) stops the run at the end of the step under way once set: `RunCancelled`.
    """
    preset = resolve_preset(preset)
    settings = resolve_settings(
        preset, prompt=prompt, negative_prompt=negative_prompt, seed=seed, num_inference_steps=num_inference_steps,
        num_frames=num_frames, height=height, width=width, guidance_scale=guidance_scale,
    )
    steps = settings["num_inference_steps"]
    config = resolve_config(
        preset, steps, profile=profile, threshold=threshold, reuse_interval=reuse_interval, tail_fraction=tail_fraction, mode=mode,
        indicator_blocks=indicator_blocks, indicator_feature=indicator_feature, extrapolation=extrapolation,
    )
    if compare_with is not None:
        peers.check_method(compare_with)
    if context_parallel is not None:
        parallel.check_kind(context_parallel)
        if compare_with is not None:
            raise ValueError(PEERS_UNDER_CONTEXT_PARALLEL)
    device = device or default_device()
    pipe = pipe if pipe is not None else get_pipeline(preset, device)
    check_prompt(pipe, preset, settings)
    if context_parallel is not None:
        parallel.ensure_context_parallel(pipe, context_parallel)
    if compare_with is not None and parallel.run_description(pipe) is not None:
        raise ValueError(PEERS_UNDER_CONTEXT_PARALLEL)
    if compare_with is not None:
        reason = peers.applicability(compare_with, pipe, settings)
        if reason:
            raise ValueError(reason)

    names = ["warm-up and distance map", "uncached", "BWCache"]
    if compare_with is not None:
        names += [f"{peers.METHODS[compare_with]} calibration"] * (compare_with == "magcache")
        names.append(peers.METHODS[compare_with])
    stages = _Stages(progress, names, steps, cancel)
    baseline_trace, warm_frames, block_share = _traced_warmup(
        pipe, preset, settings, device, stages.reporter(0), indicator_feature=config.indicator_feature
    )
    baseline_frames, baseline_seconds = generate(pipe, preset, settings, device, stages.reporter(1))
    with cached(pipe, config) as handle:
        cached_frames, cached_seconds = generate(pipe, preset, settings, device, stages.reporter(2))
    trace = handle.trace.to_dict()
    peer_entry, peer_frames = None, None
    if compare_with is not None:
        peer_frames, peer_seconds = run_peer(
            compare_with, pipe, preset, settings, device, [stages.reporter(k) for k in range(3, len(names))]
        )
        peer_entry = {
            "method": compare_with,
            "label": peers.METHODS[compare_with],
            "seconds": peer_seconds,
            "speedup": baseline_seconds / peer_seconds,
            **_quality(baseline_frames, peer_frames, device),
        }

    sharded = parallel.run_description(pipe)
    record = {
        "preset": preset.name,
        "model": preset.label,
        "prompt": settings["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "seed": settings["seed"],
        "settings": {key: settings[key] for key in SETTING_KEYS[2:] + ("fps",)},
        "device": device_name(device) if sharded is None else f"{sharded['processes']} × {device_name(device)}",
        "context_parallel": sharded,
        "baseline_seconds": baseline_seconds,
        "bwcache_seconds": cached_seconds,
        "speedup": baseline_seconds / cached_seconds,
        **_quality(baseline_frames, cached_frames, device),
        "reuse_fraction": reuse_fraction(trace),
        "block_share": block_share,
        "ideal_speedup": ideal_speedup(reuse_fraction(trace), block_share),
        "trigger_steps": {name: branch["trigger_step"] for name, branch in trace["branches"].items()},
        "profile": profile or "default",
        "config": config.to_dict(),
        "trace": trace,
        "baseline_trace": baseline_trace,
        "peer": peer_entry,
        "warmup_identical": bool(np.array_equal(warm_frames, baseline_frames)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return Comparison(record, baseline_frames, cached_frames, peer_frames)


def run_peer(method: str, pipe, preset: Preset, settings: dict, device: str, reporters=(None, None), params=None):
    """One timed generation with a peer cache (after MagCache's own calibration run): (frames, seconds)."""
    reporters = list(reporters)
    mag_ratios = None
    if method == "magcache":
        report = reporters.pop(0) if len(reporters) > 1 else None
        mag_ratios = peers.calibrate_magcache(
            pipe, lambda: generate(pipe, preset, settings, device, report), settings["num_inference_steps"]
        )
    peer = peers.enable_peer(method, pipe, settings, params=params, mag_ratios=mag_ratios)
    try:
        return generate(pipe, preset, settings, device, reporters[-1] if reporters else None)
    finally:
        peer.remove()


def check_prompt(pipe, preset: Preset, settings: dict) -> None:
    """Reject prompts the model cannot read before any generation starts (the tiny model's vocabulary)."""
    if preset.kind == "tiny":
        pipe.encode_prompt(settings["prompt"], settings["negative_prompt"], True)


def tuning_curve(baseline_trace: dict, config: BWCacheConfig, thresholds=None, block_share: float | None = None):
    """δ → trigger (block-wise: first reuse) step, reuse fraction and predicted speedup, from an uncached trace, for
    the config's own mode: exact in paper and static mode, estimated in block-wise mode (`schedule_for`)."""
    if thresholds is None:
        if config.mode == "paper":
            values = [v for branch in baseline_trace["branches"].values() for v in branch["indicator"] if v is not None]
            top = max(values) if values else 0.0
        else:
            top = largest_decision_distance(baseline_trace, config)
        top = top * 1.05 if top else 0.5
        thresholds = np.unique(np.concatenate([np.linspace(0.0, top, 41), [config.threshold]]))
    points = []
    for delta in thresholds:
        candidate = BWCacheConfig(**{**config.to_dict(), "threshold": float(delta)})
        predicted = schedule_for(baseline_trace, candidate)
        triggers = [b["trigger_step"] for b in predicted["branches"].values() if b["trigger_step"] is not None]
        points.append(
            {
                "threshold": float(delta),
                "trigger_step": min(triggers) if triggers else None,
                "reuse_fraction": predicted["reuse_fraction"],
                "predicted_speedup": ideal_speedup(predicted["reuse_fraction"], 1.0 if block_share is None else block_share),
            }
        )
    return points


def run_sweep(
    preset: str | Preset = "tiny-shapes",
    prompt: str | None = None,
    seed: int | None = None,
    thresholds=(0.05, 0.1, 0.15, 0.2, 0.3),
    *,
    device: str | None = None,
    pipe=None,
    progress: Progress | None = None,
    cancel=None,
    **overrides,
) -> dict:
    """The cached pipeline at several δ against one uncached run: measured speedup, PSNR and SSIM per δ (the other
    cache settings from the preset's `profile`, changed by any given)."""
    preset = resolve_preset(preset)
    cache_keys = ("profile", "reuse_interval", "tail_fraction", "mode", "indicator_blocks", "indicator_feature",
                  "extrapolation")
    cache_overrides = {key: overrides.pop(key) for key in cache_keys if key in overrides}
    settings = resolve_settings(preset, prompt=prompt, seed=seed, **overrides)
    steps = settings["num_inference_steps"]
    thresholds = [float(t) for t in thresholds]
    for delta in thresholds:
        resolve_config(preset, steps, threshold=delta, **cache_overrides)
    device = device or default_device()
    pipe = pipe if pipe is not None else get_pipeline(preset, device)
    check_prompt(pipe, preset, settings)

    names = ["warm-up", "uncached"] + [f"δ={t:g}" for t in thresholds]
    stages = _Stages(progress, names, steps, cancel)
    feature = resolve_config(preset, steps, threshold=0.0, **cache_overrides).indicator_feature
    baseline_trace, _, block_share = _traced_warmup(
        pipe, preset, settings, device, stages.reporter(0), indicator_feature=feature
    )
    baseline_frames, baseline_seconds = generate(pipe, preset, settings, device, stages.reporter(1))
    rows = []
    for k, delta in enumerate(thresholds):
        config = resolve_config(preset, steps, threshold=delta, **cache_overrides)
        with cached(pipe, config) as handle:
            frames, seconds = generate(pipe, preset, settings, device, stages.reporter(k + 2))
        reuse = handle.trace.reuse_fraction
        rows.append(
            {
                "threshold": delta,
                "seconds": seconds,
                "speedup": baseline_seconds / seconds,
                **_quality(baseline_frames, frames, device),
                "reuse_fraction": reuse,
                "ideal_speedup": ideal_speedup(reuse, block_share),
                "trigger_steps": {n: b["trigger_step"] for n, b in handle.trace.to_dict()["branches"].items()},
            }
        )
    return {
        "preset": preset.name,
        "prompt": settings["prompt"],
        "seed": settings["seed"],
        "device": device_name(device),
        "baseline_seconds": baseline_seconds,
        "block_share": block_share,
        "rows": rows,
        "baseline_trace": baseline_trace,
    }


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, _package: package_version()}
