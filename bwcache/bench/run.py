"""The benchmark's driver: every method on every prompt, side by side with the uncached run, then the cache's
overheads and its extra peak memory."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch

from .. import peers
from ..apply import cached
from ..blocks import find_blocks
from ..config import BWCacheConfig
from ..instruments import ForwardTimer, block_timer, peak_tensor_bytes, pipeline_weight_bytes, probe_flops, synchronize
from ..metrics import compare_videos
from ..pipelines import default_device, device_name, get_pipeline
from ..presets import is_profile_file
from ..runner import (check_prompt, generate, profile_warnings, resolve_config, resolve_preset, resolve_settings,
                      timing_flag)
from .methods import Method

# Overheads are measured on the first few prompts only: they vary little between prompts.
OVERHEAD_PROMPTS = 3
OVERHEAD_REPEATS = 5


class Progress:
    """Progress lines with an ETA, from the generations done so far and those still planned."""

    def __init__(self, report, planned: int):
        self.report = report
        self.planned = planned
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, generations: int, where: str) -> None:
        self.done += generations
        if self.report is None:
            return
        elapsed = time.perf_counter() - self.started
        left = max(self.planned - self.done, 0) * elapsed / max(self.done, 1)
        self.report(f"{where} · {_minutes(elapsed)} elapsed, about {_minutes(left)} left")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _planned_generations(prompts: int, methods: list[Method], repeats: int) -> int:
    """Generations a benchmark runs, for its ETA (the overheads' and memory passes included)."""
    per_prompt = 3 + any(m.kind == "magcache" for m in methods) + len(methods) * (1 + repeats) + repeats
    overheads = 1 + 4 + 2 * OVERHEAD_REPEATS
    return prompts * per_prompt + min(prompts, OVERHEAD_PROMPTS) * overheads + 1 + len(MEMORY_KEYS)


def run_benchmark(preset_name, prompts, methods, repeats=3, seed=0, device=None, progress=print, pipe=None,
                  overhead_repeats=OVERHEAD_REPEATS) -> dict:
    preset = resolve_preset(preset_name)
    device = device or default_device()
    pipe = pipe if pipe is not None else get_pipeline(preset, device)
    per_method: dict[str, dict[str, list]] = {m.key: {"speedup": [], "psnr": [], "ssim": [], "skipped": [], "seconds": []} for m in methods}
    skipped_reasons: dict[str, str] = {}
    overheads = {"indicator": [], "cache_work": [], "cache_work_other_storage": [], "ideal_ratio": [], "block_share": []}
    uncached_seconds = []
    steps_used: dict[str, list[int]] = {m.key: [] for m in methods if m.kind == "steps"}
    started = time.perf_counter()
    tracker = Progress(progress, _planned_generations(len(prompts), methods, repeats))
    # A "steps" row is measured after the row whose compute it matches.
    methods_in_order = [m for m in methods if m.kind != "steps"] + [m for m in methods if m.kind == "steps"]
    for p, prompt in enumerate(prompts):
        where = f"[prompt {p + 1}/{len(prompts)}]"
        settings = resolve_settings(preset, prompt=prompt, seed=seed + p)
        check_prompt(pipe, preset, settings)
        generate(pipe, preset, settings, device)  # warm-up
        baseline, _ = generate(pipe, preset, settings, device)
        plain_flops = probe_flops(pipe, lambda: generate(pipe, preset, settings, device))
        calibration = None
        if any(m.kind == "magcache" for m in methods):
            calibration = peers.calibrate_magcache(
                pipe, lambda: generate(pipe, preset, settings, device), settings["num_inference_steps"]
            )
        tracker.advance(3 + (calibration is not None), f"{where} {prompt!r}: uncached run")
        active = []
        steps: dict[str, int] = {}
        for k, m in enumerate(methods_in_order):
            reason = _not_applicable(m, methods, pipe, preset, settings)
            if m.kind == "steps" and m.params["match"] in skipped_reasons:
                reason = f"It runs as many steps as {m.params['match']}'s compute allows, and that row did not run."
            if reason:
                skipped_reasons[m.key] = reason
                continue
            if m.kind == "steps":
                # As many uncached steps as the matched row's compute buys.
                matched = per_method[m.params["match"]]["skipped"][-1]
                steps[m.key] = max(1, round(settings["num_inference_steps"] * (1.0 - matched)))
                steps_used[m.key].append(steps[m.key])
            run_settings = m.settings_for(settings, steps)
            try:
                remove, _ = m.enable(pipe, preset, run_settings, calibration)
                try:
                    frames_holder = {}
                    flops = probe_flops(
                        pipe, lambda: frames_holder.setdefault("f", generate(pipe, preset, run_settings, device)[0])
                    )
                finally:
                    remove()
            except Exception as error:
                if m.kind in ("bwcache", "steps"):
                    raise
                # A peer that fails here fails for every prompt: its row says why, the others go on.
                skipped_reasons[m.key] = f"failed on this pipeline: {type(error).__name__}: {error}"
                tracker.advance(1, f"{where} [method {k + 1}/{len(methods)}] {m.label}: failed ({error})")
                continue
            quality = compare_videos(baseline, frames_holder["f"], device=device)
            per_method[m.key]["psnr"].append(quality["psnr"])
            per_method[m.key]["ssim"].append(quality["ssim"])
            per_method[m.key]["skipped"].append(1.0 - flops / plain_flops)
            active.append(m)
            tracker.advance(1, f"{where} [method {k + 1}/{len(methods)}] {m.label}: quality")
        for r in range(repeats):
            _, t_plain = generate(pipe, preset, settings, device)
            uncached_seconds.append(t_plain)
            for m in active:
                run_settings = m.settings_for(settings, steps)
                remove, _ = m.enable(pipe, preset, run_settings, calibration)
                try:
                    _, t = generate(pipe, preset, run_settings, device)
                finally:
                    remove()
                per_method[m.key]["seconds"].append(t)
                per_method[m.key]["speedup"].append(t_plain / t)
            tracker.advance(1 + len(active), f"{where} timed repeat {r + 1}/{repeats} of every method")
        if p < OVERHEAD_PROMPTS:
            overheads_for_prompt(pipe, preset, settings, device, overheads, overhead_repeats)
            tracker.advance(1 + 4 + 2 * overhead_repeats, f"{where} the cache's overheads")

    rows = []
    for m in methods:
        data = per_method[m.key]
        if not data["speedup"]:
            rows.append({"key": m.key, "label": m.label, "family": m.group, "skipped_reason": skipped_reasons.get(m.key),
                         "speedup": None, "psnr": None, "ssim": None, "skipped": None})
            continue
        label = m.label
        if m.key in steps_used:
            used = sorted(set(steps_used[m.key]))
            label += f" ({used[0]} steps)" if len(used) == 1 else f" ({used[0]}–{used[-1]} steps)"
        rows.append(
            {
                "key": m.key,
                "label": label,
                "family": m.group,
                "threshold": m.params.get("threshold"),
                "params": m.params,
                **({"profile_file": m.profile,
                    "profile_warnings": profile_warnings(preset, m.profile, resolve_settings(preset, prompt=prompts[0]))}
                   if is_profile_file(m.profile) else {}),
                **({"steps": steps_used[m.key]} if m.key in steps_used else {}),
                "speedup": statistics.median(data["speedup"]),
                "speedup_min": min(data["speedup"]),
                "speedup_max": max(data["speedup"]),
                "psnr": _finite_mean(data["psnr"]),
                "psnr_min": min(data["psnr"]),
                "ssim": float(np.mean(data["ssim"])),
                "skipped": float(np.mean(data["skipped"])),
                **_timing_check(statistics.median(data["speedup"]), float(np.mean(data["skipped"]))),
            }
        )
    memory = memory_overhead(pipe, preset, resolve_settings(preset, prompt=prompts[0], seed=seed), device)
    settings = resolve_settings(preset, prompt=prompts[0], seed=seed)
    tracker.advance(1 + len(MEMORY_KEYS), "memory")
    return {
        "preset": preset.name,
        "model": preset.label,
        "device": device_name(device),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "settings": {k: settings[k] for k in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")},
        "prompts": prompts,
        "repeats": repeats,
        "uncached_seconds_median": statistics.median(uncached_seconds),
        "rows": rows,
        "overheads": {
            "indicator_share_of_step": statistics.median(overheads["indicator"]),
            "block_share_of_time": statistics.median(overheads["block_share"]),
            "cache_work_share_default": statistics.median(overheads["cache_work"]),
            "other_storage": other_storage(resolve_config(preset, settings["num_inference_steps"])).cache_dtype,
            "cache_work_share_other_storage": statistics.median(overheads["cache_work_other_storage"]),
            "achieved_over_ideal": statistics.median(overheads["ideal_ratio"]) if overheads["ideal_ratio"] else None,
            "achieved_over_ideal_range": [min(overheads["ideal_ratio"]), max(overheads["ideal_ratio"])]
            if overheads["ideal_ratio"] else None,
            "prompts": min(OVERHEAD_PROMPTS, len(prompts)),
            "repeats": overhead_repeats,
            **memory,
        },
        "seconds_total": time.perf_counter() - started,
    }


def _timing_check(speedup: float, skipped: float) -> dict:
    """The speedup the skipped compute gives (total FLOPs over the row's FLOPs) and whether the measured median is far
    from it in either direction (`runner.timing_flag`)."""
    ideal = 1.0 / (1.0 - skipped) if skipped < 1 else None
    return {"ideal_speedup": ideal, "timing_flag": timing_flag(speedup, ideal, skipped)}


def _not_applicable(method: Method, methods: list[Method], pipe, preset, settings) -> str | None:
    """Why a row is left out on this pipeline and preset (None when it runs)."""
    if method.kind in peers.UNAVAILABLE:
        return peers.UNAVAILABLE[method.kind]
    if method.kind == "steps":
        return None
    if method.kind != "bwcache":
        return peers.applicability(method.kind, pipe, settings)
    if method.profile is not None and method.profile not in preset.profile_names and not is_profile_file(method.profile):
        return f"{preset.label} names no {method.profile} profile."
    parent = next((m for m in methods if m.key == method.parent), None)
    if parent is not None:
        steps = settings["num_inference_steps"]
        mine = resolve_config(preset, steps, profile=method.profile, **method.params)
        if mine == resolve_config(preset, steps, profile=parent.profile, **parent.params):
            return f"The same config as {parent.label} on this preset."
    return None


def _finite_mean(values):
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def overheads_for_prompt(pipe, preset, settings, device, overheads, repeats=OVERHEAD_REPEATS):
    """The cache's overheads on one prompt.

    * block share: the DiT blocks' own forward over an uncached generation's time;
    * the cache's own work (its hooks, timed inside one run as the time in the hooked transformer and blocks minus
      their own forward) over generation time, at threshold 0 (distances every step: the indicator's cost) and with
      the default config;
    * achieved ÷ ideal speedup of the default config, wall-clock: `repeats` times an uncached and a cached run follow
      each other, and each kind's time is the sum over denoising steps of that step's fastest repeat (plus the
      fastest remainder outside the steps): interference from the machine only ever adds time.
    """
    steps = settings["num_inference_steps"]
    timer = block_timer(pipe.transformer, device)
    try:
        _, seconds = generate(pipe, preset, settings, device)
    finally:
        timer.remove()
    share = timer.seconds / seconds
    overheads["block_share"].append(share)

    config = resolve_config(preset, steps)
    # The indicator the preset measures, on every block at every step.
    observe = BWCacheConfig(threshold=0.0, num_inference_steps=steps, indicator_token_stride=config.indicator_token_stride)
    def run():
        return generate(pipe, preset, settings, device)[1]

    indicator, cache_work, other = cache_work_shares(
        pipe.transformer, run, (observe, config, other_storage(config)), device
    )
    overheads["indicator"].append(indicator)
    overheads["cache_work"].append(cache_work)
    overheads["cache_work_other_storage"].append(other)

    plain, cached = [], []
    for _ in range(repeats):
        plain.append(_step_seconds(pipe, preset, settings, device))
        with _applied(pipe, config) as handle:
            cached.append(_step_seconds(pipe, preset, settings, device))
    reuse = handle.trace.reuse_fraction
    if reuse > 0:
        speedup = _fastest(plain) / _fastest(cached)
        overheads["ideal_ratio"].append(speedup * (1.0 - reuse * share))


def cache_work_shares(transformer, run, configs, device) -> list[float]:
    """For each config: BWCache's own time during `run()` (its hooks, outside the transformer's and blocks' own
    forward) over the seconds `run()` returns, less what the two timers cost when nothing sits between them."""
    timers_alone = _hook_share(transformer, run, None, device)
    return [_hook_share(transformer, run, config, device) - timers_alone for config in configs]


def _hook_share(transformer, run, config: BWCacheConfig | None, device) -> float:
    modules = [transformer] + [spec.module for spec in find_blocks(transformer)]
    inner = ForwardTimer(modules, device)
    try:
        with _applied(transformer, config):
            outer = ForwardTimer(modules, device, around_call=True)
            try:
                seconds = run()
            finally:
                outer.remove()
    finally:
        inner.remove()
    return (outer.seconds - inner.seconds) / seconds


@contextmanager
def _applied(target, config: BWCacheConfig | None):
    """BWCache with `config` on a pipeline or transformer for the block (nothing when `config` is None); yields the handle."""
    if config is None:
        yield None
        return
    with cached(target, config) as handle:
        yield handle


def _step_seconds(pipe, preset, settings, device) -> tuple[float, list[float]]:
    """One generation: its total seconds and the seconds of denoising steps 1…T−1 (end of one step to the next)."""
    marks = []

    def mark(step: int) -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    _, total = generate(pipe, preset, settings, device, mark)
    return total, list(np.diff(marks))


def _fastest(runs: list[tuple[float, list[float]]]) -> float:
    """Per-step minimum over repeats, summed, plus the minimum of the time outside those steps."""
    per_step = np.min([steps for _, steps in runs], axis=0)
    rest = min(total - sum(steps) for total, steps in runs)
    return float(per_step.sum() + rest)


def other_storage(config: BWCacheConfig) -> BWCacheConfig:
    """`config` with the other storage choice: bfloat16 where it keeps the model's dtype, else the model's dtype."""
    return dataclasses.replace(config, cache_dtype="bfloat16" if config.cache_dtype is None else None)


def _storage_text(config: BWCacheConfig) -> str:
    return f"cached tensors in {config.cache_dtype}" if config.cache_dtype else "cached tensors in the model's dtype"


MEMORY_KEYS = ("default", "default_other_storage", "full_trace", "paper", "paper_other_storage")


def memory_configs(config: BWCacheConfig) -> dict[str, tuple[str, BWCacheConfig]]:
    """The configs whose extra peak memory is reported, by key: (description, config)."""
    # Paper mode forced to trigger at step 1: its features until the trigger, then one residual per branch.
    paper = BWCacheConfig(mode="paper", threshold=1e9, num_inference_steps=config.num_inference_steps,
                          indicator_token_stride=config.indicator_token_stride, cache_dtype=config.cache_dtype)
    return {
        "default": (f"the preset default config ({_storage_text(config)})", config),
        "default_other_storage": (f"the preset default, {_storage_text(other_storage(config))}", other_storage(config)),
        "full_trace": ("the preset default at threshold 0 (every distance measured, nothing reused)",
                       dataclasses.replace(config, threshold=0.0)),
        "paper": (f"paper mode triggered at step 1, the preset's token stride, {_storage_text(paper)}", paper),
        "paper_other_storage": (f"paper mode as above, {_storage_text(other_storage(paper))}", other_storage(paper)),
    }


def memory_overhead(pipe, preset, settings, device) -> dict:
    """Peak tensor memory of one generation, uncached and with each of `memory_configs`."""
    weights = pipeline_weight_bytes(pipe)

    def peak(cache_config: BWCacheConfig | None) -> int:
        with _applied(pipe, cache_config):
            return peak_tensor_bytes(lambda: generate(pipe, preset, settings, device), device)

    plain = peak(None)
    extra = {}
    for key, (label, config) in memory_configs(resolve_config(preset, settings["num_inference_steps"])).items():
        cached = peak(config)
        extra[key] = {"label": label, "bytes": cached - plain, "over_total": (cached - plain) / (plain + weights)}
    return {"weights_bytes": weights, "peak_activation_bytes_uncached": plain, "extra_peak": extra}
