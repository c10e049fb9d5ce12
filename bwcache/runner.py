"""One prompt with and without BWCache, timed side by side in one process, with quality and traces.

`run_comparison` is what the app's Run button, the `compare` API endpoint and `python -m bwcache compare` call.
Order of work: a threshold-0 run (warm-up, and the uncached run's full distance map: bit-identical to an uncached
run), then the timed uncached run with no hooks at all, then the timed cached run. Same seed for all three.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import torch

from . import __name__ as _package
from . import parallel, peers
from .config import CACHE_SETTINGS, BWCacheConfig
from .apply import cached
from .instruments import block_timer, synchronize
from .guardrails import schedule_warnings
from .images import as_frame, fit_image, read_image
from .metrics import compare_videos, psnr
from .policies import distance_map_config
from .pipelines import default_device, prepare_call, device_name, get_pipeline, pipeline_for
from .calibrate.profile import is_profile_path, read_profile
from .calibrate.profile import warn as warn_profile
from .presets import DEFAULT_PROFILE, Preset, load_preset
from .resources import package_version
from .settings import short_repr
from .tuning import ideal_speedup
from .trace import reuse_fraction

Progress = Callable[[float, str], None]
PEERS_UNDER_CONTEXT_PARALLEL = (
    "--compare-with cannot run under context parallelism: the peer caches decide on each process's own shard, so "
    "processes would disagree and wait on each other forever."
)
# How R says "10% of the steps" in forms and flags.
AUTO = CACHE_SETTINGS["reuse_interval"].none_word

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
    # The first frame the run was given, fitted to the video (a PIL image), or None.
    image: object | None = field(default=None, repr=False)

    def as_uint8(self) -> "Comparison":
        """The same comparison with uint8 frames: a quarter of the bytes, for crossing a process boundary (the
        quality figures are already in the record, computed on the float frames)."""
        from .video import to_uint8

        peer = None if self.peer_frames is None else to_uint8(self.peer_frames)
        return Comparison(self.record, to_uint8(self.baseline_frames), to_uint8(self.bwcache_frames), peer, self.image)


def resolve_preset(preset: str | Preset) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def resolve_settings(preset: Preset, **overrides) -> dict:
    """The preset's defaults with the given overrides, checked against the preset's limits; a first frame
    (`image`: a path, bytes, a PIL image or an array) is read, checked and fitted to the video's size, with a note
    (`image_note`) saying what was done."""
    image = overrides.pop("image", None)
    settings = {key: preset.defaults.get(key) for key in SETTING_KEYS + ("fps", "seed")}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    if isinstance(settings["prompt"], str):
        settings["prompt"] = settings["prompt"].strip()
    preset.validate_request(**{key: settings[key] for key in SETTING_KEYS if key != "negative_prompt"})
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer from 0 to {2**32 - 1}, got {short_repr(seed)}.")
    settings["seed"] = int(seed)
    settings["image"], settings["image_note"] = _first_frame(preset, image, settings)
    return settings


def _first_frame(preset: Preset, image, settings: dict):
    """The request's first frame fitted to the video, and what fitting it did; a preset that takes none, or needs
    one, says so."""
    if image is None:
        if preset.image == "required":
            raise ValueError(f"Image: {preset.label} makes a video from a first frame; give an image (PNG, JPEG or "
                             "WebP).")
        return None, None
    if preset.image is None:
        raise ValueError(f"Image: {preset.label} takes no image; leave it out, or choose an image-to-video preset.")
    return fit_image(read_image(image), settings["width"], settings["height"])


def resolve_config(preset: Preset, num_steps: int, profile: str | None = None, request: dict | None = None,
                   **overrides) -> BWCacheConfig:
    """The cache settings of one of the preset's profiles (its default when None) with overrides, as a config for
    `num_steps` steps; an override may say a setting's `none_word` (`reuse_interval="auto"`: 10% of the steps).

    `profile` may be a path to a profile file (`python -m bwcache calibrate`, `Calibration.save`): its settings,
    those counted in steps scaled to `num_steps`. Used at another step count, size or model than it was measured
    for, it warns (`ProfileMismatchWarning`, naming the differences: `profile_warnings` gives them as a list);
    `request` holds the generation settings it is compared with (height, width, num_frames, guidance_scale)."""
    values = preset.profile_settings(profile, num_steps)
    if is_profile_path(profile):
        warn_profile(profile_warnings(preset, profile, {**(request or {}), "num_inference_steps": num_steps}))
    for name, value in overrides.items():
        if value is not None:
            values[name] = preset.settings[name].resolve(value) if name in preset.settings else value
    values["num_inference_steps"] = num_steps
    return preset.settings.make(values)


def tuned_steps(preset: Preset, profile) -> int | None:
    """The step count a profile's settings were tuned at: a profile file's calibration steps, else the preset's
    default step count."""
    if is_profile_path(profile):
        return read_profile(profile).setting.get("num_inference_steps")
    return preset.defaults["num_inference_steps"]


def profile_warnings(preset: Preset, profile, settings: dict) -> list[str]:
    """What to say when a profile file is used with `preset` and generation `settings` (steps, size, frames,
    guidance): the differences from the setting it was calibrated for, and a target it missed. Empty for a
    built-in profile."""
    if not is_profile_path(profile):
        return []
    return read_profile(profile).warnings_for(preset_setting(preset, settings))


def preset_setting(preset: Preset, settings: dict) -> dict:
    """A run's setting in the terms of a profile file (`bwcache.calibrate.profile.SETTING_LABELS`)."""
    model = preset.model
    return {
        "preset": preset.name,
        "transformer_class": model.get("transformer_class"),
        "transformer_config": dict(model["transformer"]) if model.get("transformer") else None,
        "pipeline_class": (preset.pipeline_class or "").rsplit(".", 1)[-1] or None,
        "dtype": preset.dtype,
        **{key: settings.get(key) for key in ("num_inference_steps", "height", "width", "num_frames",
                                               "guidance_scale")},
    }


def resolve_run(preset: Preset, prompt=None, seed=None, config: BWCacheConfig | None = None,
                profile: str | None = None, **overrides) -> tuple[dict, BWCacheConfig]:
    """The generation settings and the cache config of a run: the preset's defaults, changed by `overrides`
    (generation settings by their names in `SETTING_KEYS`, cache settings by theirs), or `config` as given."""
    generation = {key: overrides.pop(key) for key in (*SETTING_KEYS, "image") if key in overrides}
    settings = resolve_settings(preset, prompt=prompt, seed=seed, **generation)
    if config is None:
        return settings, resolve_config(preset, settings["num_inference_steps"], profile=profile, request=settings,
                                        **overrides)
    if profile is not None or any(value is not None for value in overrides.values()):
        raise ValueError("Give a config, or a profile and the cache settings that change it, not both.")
    if not isinstance(config, BWCacheConfig):
        raise TypeError(f"config must be a BWCacheConfig, got {type(config).__name__}.")
    return settings, config


def _frames(output) -> np.ndarray:
    frames = output.frames[0]
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    return np.asarray(frames, dtype=np.float32)


def generate(pipe, preset: Preset, settings: dict, device: str, on_step: Callable[[int], None] | None = None):
    """One timed generation: returns (frames, seconds). The seed fixes the initial noise on the CPU for all devices."""
    kwargs = prepare_call(pipe, preset, settings)
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


# A measured speedup below this share of the ideal one, or above its inverse, is flagged (`timing_flag`).
TIMING_LOW, TIMING_HIGH = 0.8, 1.25


def timing_flag(speedup: float | None, ideal: float | None, reuse: float) -> str | None:
    """"below_ideal" or "above_ideal" when a measured speedup is far from what the skipped compute should give
    (below 0.8× or above 1.25× the ideal), else None. Far below: the cache's own work, or something slowing the
    cached run; far above: something slowed the uncached run (another process on the CPU or GPU)."""
    if not ideal or not speedup or reuse <= 0:
        return None
    if speedup < TIMING_LOW * ideal:
        return "below_ideal"
    if speedup > TIMING_HIGH * ideal:
        return "above_ideal"
    return None


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


def _traced_warmup(pipe, preset, settings, device, report, config: BWCacheConfig, measure_blocks=True):
    """The threshold-0 run: warms up, records the distance map of what `config` decides on (its feature, indicator
    blocks, token stride and storage: `distance_map_config`) and the share of time spent in DiT blocks."""
    # The timer goes on first, so it sits inside BWCache's block hooks: the cache's own work is not block time.
    timer = block_timer(pipe, device) if measure_blocks else None
    try:
        with cached(pipe, distance_map_config(config)) as handle:
            frames, seconds = generate(pipe, preset, settings, device, report)
    finally:
        if timer is not None:
            timer.remove()
    block_share = timer.seconds / seconds if timer is not None and seconds > 0 else None
    return handle.trace.to_dict(), frames, block_share


def run_comparison(
    preset: str | Preset = "tiny-shapes",
    prompt: str | None = None,
    seed: int | None = None,
    *,
    config: BWCacheConfig | None = None,
    profile: str | None = None,
    compare_with: str | None = None,
    device: str | None = None,
    pipe=None,
    progress: Progress | None = None,
    context_parallel: str | None = None,
    cancel=None,
    timing_repeats: int = 1,
    **overrides,
) -> Comparison:
    """Run `prompt` without and with BWCache on the preset's model and return the run record and both videos.

    `overrides` change the preset's generation settings (`SETTING_KEYS`: `num_inference_steps=`, `height=`, ...)
    and its cache settings (`bwcache.config.CACHE_SETTINGS`: `threshold=`, `mode=`, ...); those left out, or None,
    take the preset's defaults, the cache settings those of its `profile` (`preset.profile_names`; its default when
    None). `config` gives the cache config whole instead. `compare_with` names a peer cache (`bwcache.peers.METHODS`)
    to run on the same prompt and seed as well. `pipe` may pass an already built pipeline of the preset's class
    (tests use tiny random components); otherwise the preset's pipeline is loaded (once) on `device`.
    `context_parallel` (one of `bwcache.parallel.KINDS`) shards the denoisers over all processes of an initialised
    `torch.distributed` group (`bwcache.parallel.init_distributed()`); every process calls this function.
    `cancel` (a `threading.Event`) stops the run at the end of the step under way once set: `RunCancelled`.
    `timing_repeats` times the uncached and cached generations that many times, alternating (uncached, cached,
    uncached, …): the record's seconds are then medians, its speedup the median of the pairs' speedups, with
    `speedup_min`, `speedup_max` and every pair in `speedup_runs` (1, the default, times one pair).
    `profile` may be a path to a profile file (`resolve_config`); the record's `profile_warnings` says where it does
    not fit the run.
    """
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or not 1 <= timing_repeats <= 20:
        raise ValueError(f"timing_repeats must be a whole number from 1 to 20, got {timing_repeats!r}.")
    preset = resolve_preset(preset)
    settings, config = resolve_run(preset, prompt, seed, config, profile, **overrides)
    warnings_for_profile = profile_warnings(preset, profile, settings)
    steps = settings["num_inference_steps"]
    if compare_with is not None:
        peers.check_method(compare_with)
    if context_parallel is not None:
        parallel.check_kind(context_parallel)
        if compare_with is not None:
            raise ValueError(PEERS_UNDER_CONTEXT_PARALLEL)
    device = device or default_device()
    pipe = pipeline_for(pipe if pipe is not None else get_pipeline(preset, device), preset, settings)
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
    for k in range(2, timing_repeats + 1):
        names += [f"uncached (timing {k}/{timing_repeats})", f"BWCache (timing {k}/{timing_repeats})"]
    first_peer = len(names)
    if compare_with is not None:
        names += [f"{peers.METHODS[compare_with]} calibration"] * (compare_with == "magcache")
        names.append(peers.METHODS[compare_with])
    stages = _Stages(progress, names, steps, cancel)
    baseline_trace, warm_frames, block_share = _traced_warmup(
        pipe, preset, settings, device, stages.reporter(0), config
    )
    baseline_frames, baseline_seconds = generate(pipe, preset, settings, device, stages.reporter(1))
    with cached(pipe, config) as handle:
        cached_frames, cached_seconds = generate(pipe, preset, settings, device, stages.reporter(2))
    trace = handle.trace.to_dict()
    pairs = [(baseline_seconds, cached_seconds)]
    for k in range(1, timing_repeats):
        _, plain = generate(pipe, preset, settings, device, stages.reporter(1 + 2 * k))
        with cached(pipe, config):
            _, seconds = generate(pipe, preset, settings, device, stages.reporter(2 + 2 * k))
        pairs.append((plain, seconds))
    timing = timing_figures(pairs)
    peer_entry, peer_frames = None, None
    if compare_with is not None:
        peer_frames, peer_seconds = run_peer(
            compare_with, pipe, preset, settings, device, [stages.reporter(k) for k in range(first_peer, len(names))]
        )
        peer_entry = {
            "method": compare_with,
            "label": peers.METHODS[compare_with],
            "seconds": peer_seconds,
            "speedup": timing["baseline_seconds"] / peer_seconds,
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
        **timing,
        **_quality(baseline_frames, cached_frames, device),
        "image": first_frame_record(settings, baseline_frames, cached_frames, peer_frames),
        "warnings": schedule_warnings(config, steps, tuned_steps(preset, profile)),
        "reuse_fraction": reuse_fraction(trace),
        "block_share": block_share,
        "ideal_speedup": ideal_speedup(reuse_fraction(trace), block_share),
        "timing_flag": timing_flag(timing["speedup"], ideal_speedup(reuse_fraction(trace), block_share),
                                   reuse_fraction(trace)),
        "trigger_steps": {name: branch["trigger_step"] for name, branch in trace["branches"].items()},
        "profile": str(profile) if profile is not None else DEFAULT_PROFILE,
        "profile_warnings": warnings_for_profile,
        "config": config.to_dict(),
        "trace": trace,
        "baseline_trace": baseline_trace,
        "peer": peer_entry,
        "warmup_identical": bool(np.array_equal(warm_frames, baseline_frames)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    return Comparison(record, baseline_frames, cached_frames, peer_frames, settings["image"])


def first_frame_record(settings: dict, *videos) -> dict | None:
    """How closely each video's first frame matches the image it was given (PSNR, dB): uncached, BWCache, and the
    peer's when there is one; None without an image."""
    image = settings.get("image")
    if image is None:
        return None
    frame = as_frame(image)
    names = ("uncached", "bwcache", "peer")
    return {
        "size": list(image.size),
        "note": settings.get("image_note"),
        "first_frame_psnr": {name: json_number(psnr(video[0], frame)) for name, video in zip(names, videos)
                             if video is not None},
    }


def timing_figures(pairs: list[tuple[float, float]]) -> dict:
    """A run record's timing from (uncached, cached) seconds of each timed pair: one pair as it is; several as
    medians, the speedup the median of the pairs' speedups, with its range and every pair (`speedup_runs`)."""
    if len(pairs) == 1:
        plain, seconds = pairs[0]
        return {"baseline_seconds": plain, "bwcache_seconds": seconds, "speedup": plain / seconds}
    speedups = [plain / seconds for plain, seconds in pairs]
    return {
        "baseline_seconds": statistics.median(p for p, _ in pairs),
        "bwcache_seconds": statistics.median(c for _, c in pairs),
        "speedup": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "speedup_runs": [{"baseline_seconds": p, "bwcache_seconds": c, "speedup": p / c} for p, c in pairs],
    }


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


def run_sweep(
    preset: str | Preset = "tiny-shapes",
    prompt: str | None = None,
    seed: int | None = None,
    thresholds=(0.05, 0.1, 0.15, 0.2, 0.3),
    *,
    config: BWCacheConfig | None = None,
    profile: str | None = None,
    device: str | None = None,
    pipe=None,
    progress: Progress | None = None,
    cancel=None,
    **overrides,
) -> dict:
    """The cached pipeline at several δ against one uncached run: measured speedup, PSNR and SSIM per δ, each row's
    `timing_flag` saying whether its speedup is far from the ideal one (`timing_flag`). The other settings as
    `run_comparison` takes them (a given `threshold` is the sweep's to set)."""
    preset = resolve_preset(preset)
    overrides.pop("threshold", None)
    settings, base = resolve_run(preset, prompt, seed, config, profile, **overrides)
    steps = settings["num_inference_steps"]
    thresholds = [float(t) for t in thresholds]
    configs = [dataclasses.replace(base, threshold=delta) for delta in thresholds]
    device = device or default_device()
    pipe = pipeline_for(pipe if pipe is not None else get_pipeline(preset, device), preset, settings)
    check_prompt(pipe, preset, settings)

    names = ["warm-up", "uncached"] + [f"δ={t:g}" for t in thresholds]
    stages = _Stages(progress, names, steps, cancel)
    baseline_trace, _, block_share = _traced_warmup(
        pipe, preset, settings, device, stages.reporter(0), base
    )
    baseline_frames, baseline_seconds = generate(pipe, preset, settings, device, stages.reporter(1))
    rows = []
    for k, (delta, config) in enumerate(zip(thresholds, configs)):
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
                "timing_flag": timing_flag(baseline_seconds / seconds, ideal_speedup(reuse, block_share), reuse),
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
