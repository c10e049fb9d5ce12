"""Pure helpers behind the comparison app: presets as form values, input checks with readable messages, output
folders, figure and table shaping. Nothing here imports Gradio, so all of it is testable on its own."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from .config import INDICATOR_FEATURES, MODES, BWCacheConfig
from .figures import heatmap_figure, sweep_figure, tuning_figure
from .presets import DEFAULT_PROFILE, FIRST_PRESET, PRESETS_DIR, Preset, load_preset
from .report import save_comparison
from .runner import AUTO, resolve_config, resolve_settings, tuning_curve
from .schedule import EXACT_MODES
from .video import write_mp4

try:
    from .peers import METHODS as PEER_METHODS
    from .peers import UNAVAILABLE as UNAVAILABLE_PEERS
except ImportError:  # the peer comparison is optional
    PEER_METHODS: dict[str, str] = {}
    UNAVAILABLE_PEERS: dict[str, str] = {}

log = logging.getLogger(__name__)

THRESHOLD_RANGE = (0.0, 1.0)
NO_PEER = "none"
MAX_SWEEP_POINTS = 8
SEED_MAX = 2**32 - 1

# Heatmap views: key -> label shown in the app.
HEATMAP_VIEWS = {
    "uncached": "Uncached run: full distance map",
    "bwcache": "BWCache run: what it measured",
}
BRANCH_ORDER = ("cond", "uncond", "default")


# ----------------------------------------------------------------------------- presets


def available_presets(directory: str | Path | None = None, space: bool = False) -> dict[str, Preset]:
    """Every loadable preset by name, tiny-shapes first. A broken preset file is logged and left out, so one bad
    file does not take the whole app down. With `space`, only those the Space's card serves (`bwcache.space`)."""
    if space:
        from . import space as hf_space

        return hf_space.served(available_presets(directory), hf_space.card())
    directory = PRESETS_DIR if directory is None else Path(directory)
    presets = {}
    for path in sorted(directory.glob("*.json")):
        try:
            preset = load_preset(path)
        except ValueError as error:
            log.warning("Skipping preset %s: %s", path.name, error)
            continue
        presets[preset.name] = preset
    return dict(sorted(presets.items(), key=lambda item: (item[0] != FIRST_PRESET, item[0])))


def default_preset_name(presets: Mapping[str, Preset]) -> str | None:
    if FIRST_PRESET in presets:
        return FIRST_PRESET
    return next(iter(presets), None)


def _frame_step(rule: Any) -> int:
    if isinstance(rule, int) and not isinstance(rule, bool):
        return max(1, rule)
    match = re.match(r"\s*(\d+)\s*k", str(rule))
    return max(1, int(match.group(1))) if match else 1


def _frame_rule_text(rule: Any) -> str:
    step = _frame_step(rule)
    if step == 1:
        return ""
    if isinstance(rule, str) and "+" in rule:
        return f", {rule.replace(' ', '')}"
    return f", multiple of {step}"


def _fmt_number(value: float) -> str:
    return f"{value:g}"


def preset_form(preset: Preset, values: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The app's controls for a preset: per field the value (the preset's default, its cache settings those of the
    profile `values` names, unless `values` gives one), plus the step and an `info` line stating the allowed range."""
    values = dict(values or {})
    profile = values.get("profile") or DEFAULT_PROFILE
    d, lim, bw = preset.defaults, preset.limits, preset.profile_settings(profile)

    def value(key, default):
        return values[key] if values.get(key) is not None else default

    h_lo, h_hi, h_mult = lim["height"]
    w_lo, w_hi, w_mult = lim["width"]
    f_lo, f_hi, f_rule = lim["num_frames"]
    s_lo, s_hi = lim["num_inference_steps"][:2]
    g_lo, g_hi = lim["guidance_scale"][:2]
    reuse = value("reuse_interval", bw["reuse_interval"])
    return {
        "prompt": {"value": value("prompt", d["prompt"]), "info": f"At most {lim['prompt_max_chars']} characters."},
        "negative_prompt": {"value": value("negative_prompt", d["negative_prompt"])},
        "threshold": {"value": float(value("threshold", bw["threshold"]))},
        "reuse_interval": {"value": AUTO if reuse in (None, AUTO) else str(reuse)},
        "tail_fraction": {"value": float(value("tail_fraction", bw["tail_fraction"]))},
        "mode": {"value": value("mode", bw["mode"])},
        "indicator_feature": {"value": value("indicator_feature", bw.get("indicator_feature", "hidden_states"))},
        "profile": {"value": profile, "choices": list(preset.profile_names), "info": profile_info(preset, profile)},
        "extrapolation": {"value": float(value("extrapolation", bw.get("extrapolation", 0.0)))},
        "num_inference_steps": {"value": int(value("num_inference_steps", d["num_inference_steps"])), "step": 1,
                                "info": f"{s_lo} to {s_hi}"},
        "num_frames": {"value": int(value("num_frames", d["num_frames"])), "step": _frame_step(f_rule),
                       "info": f"{f_lo} to {f_hi}{_frame_rule_text(f_rule)}"},
        "height": {"value": int(value("height", d["height"])), "step": h_mult,
                   "info": f"{h_lo} to {h_hi}, multiple of {h_mult}"},
        "width": {"value": int(value("width", d["width"])), "step": w_mult,
                  "info": f"{w_lo} to {w_hi}, multiple of {w_mult}"},
        "guidance_scale": {"value": float(value("guidance_scale", d["guidance_scale"])), "step": 0.5,
                           "info": f"{_fmt_number(g_lo)} to {_fmt_number(g_hi)}"},
        "seed": {"value": int(value("seed", d["seed"]))},
    }


def profile_info(preset: Preset, profile: str | None) -> str:
    """One line about a cache profile, under its menu."""
    note = preset.profile_note(profile)
    return note[:1].upper() + note[1:]


def preset_notes(preset: Preset) -> str:
    gpu = preset.recommended_gpu_memory_gb
    needs = "runs on a CPU" if not gpu else f"needs a GPU with about {gpu:g} GB"
    if not gpu and "CPU" in preset.label:
        return f"**{preset.label}**. {preset.notes}"  # the label already says where it runs
    return f"**{preset.label}** ({needs}). {preset.notes}"


# ----------------------------------------------------------------------------- input checks


def _whole(field: str, value: Any) -> int | None:
    """Whole numbers from UI fields (which may deliver 16.0) as int; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"{field} must be a whole number, got {value!r}.")
    return int(value)


def _number(field: str, value: Any, lo: float | None = None, hi: float | None = None) -> float | None:
    if value is None:
        return None
    allowed = "" if lo is None else f" from {lo:g} to {hi:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{field} must be a number{allowed}, got {value!r}.")
    if lo is not None and not lo <= value <= hi:
        raise ValueError(f"{field} = {value:g} is outside the allowed range {lo:g} to {hi:g}.")
    return float(value)


def parse_reuse_interval(value: Any) -> int | str | None:
    """R as typed: empty means the preset's default, "auto" means 10% of the steps, else a whole number ≥ 1."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f'R (reuse interval) must be "auto" or a whole number ≥ 1, got {value!r}.') from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < 1:
        raise ValueError(f'R (reuse interval) must be "auto" or a whole number ≥ 1, got {value!r}.')
    return int(value)


def parse_thresholds(text: Any) -> list[float]:
    """A sweep's δ list from text such as "0.05, 0.1, 0.2": sorted, duplicates dropped."""
    lo, hi = THRESHOLD_RANGE
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [item for item in re.split(r"[,\s;]+", str(text or "").strip()) if item]
    if not items:
        raise ValueError(f"Sweep thresholds: give at least one δ from {lo:g} to {hi:g}, e.g. 0.05, 0.1, 0.2.")
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"Sweep thresholds: {item!r} is not a number; write δ values from {lo:g} to {hi:g} "
                             "separated by commas.") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"Sweep thresholds: δ = {item} is outside the allowed range {lo:g} to {hi:g}.")
        values.append(value)
    values = sorted(set(values))
    if len(values) > MAX_SWEEP_POINTS:
        raise ValueError(f"Sweep thresholds: {len(values)} values given; at most {MAX_SWEEP_POINTS} per sweep.")
    return values


def parse_peer(value: Any) -> str | None:
    if value in (None, "", NO_PEER):
        return None
    if value in UNAVAILABLE_PEERS:
        raise ValueError(f"Compare against: {UNAVAILABLE_PEERS[value]}")
    if value not in PEER_METHODS:
        choices = ", ".join([NO_PEER, *PEER_METHODS])
        raise ValueError(f"Compare against: unknown method {value!r}; choose one of {choices}.")
    return value


def check_seed(seed: Any, randomize: bool = False) -> int | None:
    """The seed to use: a fresh one when `randomize`, None (the preset's) when left empty."""
    if randomize:
        return secrets.randbelow(SEED_MAX + 1)
    seed = _whole("Seed", seed)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"Seed = {seed} is outside the allowed range 0 to {SEED_MAX}.")
    return seed


NEGATIVE_PROMPT_MAX_CHARS = 2000


def check_request(
    preset: Preset,
    *,
    prompt: Any = None,
    negative_prompt: Any = None,
    threshold: Any = None,
    reuse_interval: Any = None,
    tail_fraction: Any = None,
    mode: Any = None,
    num_inference_steps: Any = None,
    num_frames: Any = None,
    height: Any = None,
    width: Any = None,
    guidance_scale: Any = None,
    seed: Any = None,
    indicator_feature: Any = None,
    profile: Any = None,
    extrapolation: Any = None,
) -> dict:
    """Everything a comparison needs, checked before any model is loaded: keyword arguments for
    `run_comparison` / `run_sweep` with None meaning the preset's default. Raises ValueError naming the field and
    what is allowed."""
    if profile is not None and profile not in preset.profile_names:
        raise ValueError(f"Profile must be one of {', '.join(preset.profile_names)} for {preset.label}, got {profile!r}.")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if indicator_feature is not None and indicator_feature not in INDICATOR_FEATURES:
        raise ValueError(f"indicator feature must be one of {', '.join(INDICATOR_FEATURES)}, got {indicator_feature!r}.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative prompt must be text, got {type(negative_prompt).__name__}.")
    if isinstance(negative_prompt, str) and len(negative_prompt) > NEGATIVE_PROMPT_MAX_CHARS:
        raise ValueError(f"negative prompt is {len(negative_prompt)} characters long; at most "
                         f"{NEGATIVE_PROMPT_MAX_CHARS} are allowed.")
    request = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "threshold": _number("δ (threshold)", threshold, *THRESHOLD_RANGE),
        "reuse_interval": parse_reuse_interval(reuse_interval),
        "tail_fraction": _number("Tail fraction", tail_fraction, 0.0, 1.0),
        "mode": mode,
        "indicator_feature": indicator_feature,
        "profile": profile,
        "extrapolation": _number("Extrapolation", extrapolation, 0.0, 1.0),
        "num_inference_steps": _whole("Steps", num_inference_steps),
        "num_frames": _whole("Frames", num_frames),
        "height": _whole("Height", height),
        "width": _whole("Width", width),
        "guidance_scale": _number("Guidance scale", guidance_scale),
    }
    # The preset's limits, the prompt and the cache settings, with the runner's own checks.
    settings = resolve_settings(
        preset, **{key: request[key] for key in ("prompt", "negative_prompt", "seed", "num_inference_steps",
                                                  "num_frames", "height", "width", "guidance_scale")}
    )
    steps = settings["num_inference_steps"]
    reuse = request["reuse_interval"]
    if isinstance(reuse, int) and reuse > steps:
        raise ValueError(f"R (reuse interval) = {reuse} is more than the {steps} steps; use 1 to {steps} or auto.")
    request_config(preset, request)
    return request


def request_config(preset: Preset, request: Mapping[str, Any]) -> BWCacheConfig:
    """The cache configuration a checked request resolves to (preset defaults filled in)."""
    steps = resolved_settings(preset, request)["num_inference_steps"]
    keys = ("profile", "threshold", "reuse_interval", "tail_fraction", "mode", "indicator_feature", "extrapolation")
    return resolve_config(preset, steps, **{key: request.get(key) for key in keys})


def resolved_settings(preset: Preset, request: Mapping[str, Any]) -> dict:
    """The generation settings a checked request resolves to (preset defaults filled in)."""
    keys = ("prompt", "negative_prompt", "seed", "num_inference_steps", "num_frames", "height", "width",
            "guidance_scale")
    return resolve_settings(preset, **{key: request.get(key) for key in keys})


# ----------------------------------------------------------------------------- messages and estimates


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


# ----------------------------------------------------------------------------- output folders


PARTIAL_PREFIX = ".partial-"


def new_run_dir(root: str | Path, kind: str = "run") -> Path:
    """A new, empty folder under `root` named by time and a random suffix; never an existing one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def save_run_folder(root: str | Path, kind: str, write) -> dict:
    """`write(folder)`'s files in a new run folder under `root`, which appears only once complete: they are written
    into a hidden `.partial-` folder first and moved into place in one rename. Returns `write`'s paths, moved."""
    partial = new_run_dir(root, kind)
    hidden = partial.with_name(PARTIAL_PREFIX + partial.name)
    partial.rename(hidden)
    try:
        paths = write(hidden)
        hidden.rename(partial)
    except BaseException:
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    return {key: str(partial / Path(path).relative_to(hidden)) for key, path in paths.items()}


def remove_partial_runs(root: str | Path) -> list[Path]:
    """Delete run folders left half-written (a process stopped while saving); returns them."""
    root = Path(root)
    removed = [p for p in root.glob(PARTIAL_PREFIX + "*") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune_runs(root: str | Path, keep: int, in_use: set[str] | frozenset = frozenset()) -> list[Path]:
    """Delete the oldest complete run folders beyond the newest `keep`, never one named in `in_use`."""
    root = Path(root)
    if keep < 1 or not root.is_dir():
        return []
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(PARTIAL_PREFIX)
                  and re.match(r"\d{8}-\d{6}-", p.name))
    removed = [p for p in runs[: max(0, len(runs) - keep)] if p.name not in in_use]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def max_runs(environ: Mapping[str, str]) -> int:
    """`BWCACHE_MAX_RUNS` (default 50): how many run folders the app keeps."""
    text = environ.get("BWCACHE_MAX_RUNS", "50")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"BWCACHE_MAX_RUNS must be a whole number ≥ 1, got {text!r}.") from None
    if value < 1:
        raise ValueError(f"BWCACHE_MAX_RUNS must be a whole number ≥ 1, got {value}.")
    return value


def save_run(comparison, run_dir: str | Path) -> dict:
    """The comparison's files in `run_dir` (see `report.save_comparison`), plus the peer's video when there is one."""
    paths = save_comparison(comparison, run_dir)
    peer_frames = getattr(comparison, "peer_frames", None)
    if peer_frames is not None and "peer" not in paths:
        from .report import upscale_pair

        fps = comparison.record["settings"].get("fps") or 8
        (peer,) = upscale_pair(peer_frames)
        paths["peer"] = write_mp4(peer, Path(run_dir) / "peer.mp4", fps)
    return paths


DOWNLOAD_ORDER = ("side_by_side", "baseline", "bwcache", "peer", "record", "trace_csv")


def download_list(paths: Mapping[str, str]) -> list[str]:
    return [str(paths[key]) for key in DOWNLOAD_ORDER if paths.get(key)]


# ----------------------------------------------------------------------------- figures


def branch_choices(record: Mapping[str, Any] | None) -> list[str]:
    if not record:
        return []
    names = list(record["trace"]["branches"])
    return sorted(names, key=lambda n: (BRANCH_ORDER.index(n) if n in BRANCH_ORDER else len(BRANCH_ORDER), n))


# What the distances are measured on, in words (`BWCacheConfig.indicator_feature`).
FEATURE_LABELS = {"hidden_states": "hidden-states input", "modulated": "modulated attention input"}


def heatmap(record: Mapping[str, Any] | None, view: str = "uncached", branch: str | None = None,
            log_color: bool = False):
    """The block × step heatmap of a run record: the uncached run's full distance map with the cached run's
    reuse marked on it, or the cached run's own trace. None without a record."""
    if not record:
        return None
    choices = branch_choices(record)
    branch = branch if branch in choices else choices[0]
    trace = record["trace"]
    baseline = record.get("baseline_trace")
    feature = FEATURE_LABELS[trace["config"].get("indicator_feature", "hidden_states")]
    if view == "uncached" and baseline and branch in baseline["branches"]:
        return heatmap_figure(baseline, trace, branch=branch, log_color=log_color,
                              title=f"Uncached run: relative L1 of each block's {feature} per step ({branch}); "
                                    "× = reused by BWCache")
    return heatmap_figure(trace, branch=branch, log_color=log_color,
                          title=f"BWCache run: measured relative L1 of each block's {feature} ({branch}); × = reused")


# Modes the threshold curve covers, as the app names them; all but block-wise mode are predicted exactly.
TUNING_MODES = {"paper": "paper", "blockwise": "block-wise", "static": "static"}


def tuning_source(record: Mapping[str, Any] | None = None, *, baseline_trace=None, config=None,
                  block_share=None, measured=()) -> dict | None:
    """What the threshold-tuning view needs from a run record or a sweep, small enough for per-tab state: the
    uncached trace, the config, the DiT blocks' share of the time and the reuse fractions real runs measured
    (`measured`: dicts with `threshold` and `reuse_fraction`; a record's own run is taken from it)."""
    if record is not None:
        baseline_trace, config, block_share = record.get("baseline_trace"), record["config"], record.get("block_share")
        measured = [{"threshold": record["config"]["threshold"], "reuse_fraction": record["reuse_fraction"]}]
    if not baseline_trace:
        return None
    config = config.to_dict() if isinstance(config, BWCacheConfig) else dict(config)
    measured = [{"threshold": float(p["threshold"]), "reuse_fraction": float(p["reuse_fraction"])} for p in measured]
    return {"baseline_trace": baseline_trace, "config": config, "block_share": block_share, "measured": measured}


def tuning_view(source: Mapping[str, Any] | None, threshold: Any):
    """The δ curve for the run's own mode (paper: predicted exactly; block-wise: estimated) with `threshold` marked,
    and one line of text about that δ; (None, hint) before a run."""
    if not source:
        return None, "Run a comparison (or load an example) first: the curve is computed from its uncached run."
    config = BWCacheConfig.from_dict(source["config"])
    if config.mode not in TUNING_MODES:
        return None, f"The threshold curve covers {', '.join(TUNING_MODES.values())} mode; this run used {config.mode}."
    trace, share = source["baseline_trace"], source.get("block_share")
    estimated = config.mode not in EXACT_MODES
    measured = source.get("measured") or []
    lo, hi = THRESHOLD_RANGE
    note = ""
    if threshold is None or (isinstance(threshold, str) and not threshold.strip()):
        chosen = config.threshold  # the box emptied while a new δ is typed: the run's own δ
    else:
        try:
            chosen = float(threshold) if not isinstance(threshold, bool) else math.nan
        except (TypeError, ValueError):
            chosen = math.nan
        if not math.isfinite(chosen):
            figure = tuning_figure(tuning_curve(trace, config, block_share=share), mode=TUNING_MODES[config.mode],
                                   estimated=estimated, measured=measured)
            return figure, f"δ (threshold) must be a number from {lo:g} to {hi:g}, got {threshold!r}."
        if not lo <= chosen <= hi:
            # As the slider itself does once its box loses focus.
            clamped = min(max(chosen, lo), hi)
            note = f"δ = {chosen:g} is outside the allowed range {lo:g} to {hi:g}; the slider takes {clamped:g}. "
            chosen = clamped
    exact = tuning_curve(trace, config, thresholds=[chosen], block_share=share)[0]
    points = [p for p in tuning_curve(trace, config, block_share=share) if p["threshold"] != chosen] + [exact]
    mode = TUNING_MODES[config.mode]
    figure = tuning_figure(sorted(points, key=lambda p: p["threshold"]), chosen_threshold=chosen, mode=mode,
                           estimated=estimated, measured=measured)
    step = exact["trigger_step"]
    if config.mode == "paper":
        trigger = "no trigger (nothing reused)" if step is None else f"trigger at step {step}"
    else:
        trigger = "no block reused" if step is None else f"first reuse at step {step}"
    kind = "estimated" if estimated else "predicted"
    speed = exact["predicted_speedup"]
    text = f"{note}At δ = {chosen:g}: {trigger}, {exact['reuse_fraction']:.1%} of block evaluations reused"
    if speed is not None:
        text += f", {kind} speedup {speed:.2f}×"
    if estimated:
        text += (f" (estimated for {mode} mode: after its first reuse a run's inputs differ from the uncached "
                 "ones the estimate reads)")
    else:
        text += f" (predicted exactly for {mode} mode)"
    text += "."
    runs = [p for p in measured if math.isclose(p["threshold"], chosen, abs_tol=1e-9)]
    if runs:
        text += f" Measured at this δ: {runs[0]['reuse_fraction']:.1%} reused."
    return figure, text


# ----------------------------------------------------------------------------- sweep


SWEEP_HEADERS = ["δ", "seconds", "speedup ×", "ideal speedup ×", "PSNR dB", "SSIM", "reuse %", "identical",
                 "trigger steps"]


def _round(value, digits):
    return None if value is None else round(float(value), digits)


def sweep_table(result: Mapping[str, Any]) -> list[list]:
    rows = []
    for row in result["rows"]:
        triggers = ", ".join(f"{k} {'—' if v is None else v}" for k, v in row["trigger_steps"].items())
        rows.append([
            row["threshold"], _round(row["seconds"], 3), _round(row["speedup"], 3), _round(row.get("ideal_speedup"), 3),
            "∞" if row["identical"] else _round(row["psnr"], 2), _round(row["ssim"], 4),
            _round(100 * row["reuse_fraction"], 1), row["identical"], triggers,
        ])
    return rows


def sweep_plot(result: Mapping[str, Any]):
    rows = [{**row, "psnr": math.inf if row["identical"] else row["psnr"]} for row in result["rows"]]
    return sweep_figure(rows, title=f"Speed vs fidelity (uncached {result['baseline_seconds']:.2f} s)")


def sweep_csv(result: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["threshold", "seconds", "speedup", "ideal_speedup", "psnr", "ssim", "reuse_fraction",
                     "identical", "baseline_seconds"])
    for row in result["rows"]:
        writer.writerow([row["threshold"], row["seconds"], row["speedup"], row.get("ideal_speedup"),
                         "" if row["psnr"] is None else row["psnr"], row["ssim"], row["reuse_fraction"],
                         int(row["identical"]), result["baseline_seconds"]])
    return buffer.getvalue()


def save_sweep(result: Mapping[str, Any], run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    paths = {"csv": run_dir / "sweep.csv", "record": run_dir / "sweep.json"}
    for path in paths.values():
        if path.exists():
            raise FileExistsError(f"Refusing to overwrite {path}.")
    paths["csv"].write_text(sweep_csv(result))
    paths["record"].write_text(json.dumps(result, indent=1))
    return {key: str(path) for key, path in paths.items()}


# ----------------------------------------------------------------------------- precomputed examples


EXAMPLE_FILES = ("run.json", "baseline.mp4", "bwcache.mp4")


def list_examples(root: str | Path, presets: Mapping[str, Preset] | None = None) -> list[dict]:
    """Precomputed runs under `root/<name>/` (run.json + both videos), for presets that are available."""
    root = Path(root)
    examples = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        if not all((folder / name).is_file() for name in EXAMPLE_FILES):
            continue
        record = json.loads((folder / "run.json").read_text())
        if presets is not None and record.get("preset") not in presets:
            continue
        examples.append({"name": folder.name, "dir": folder, "record": record})
    return examples


def example_paths(folder: str | Path) -> dict:
    folder = Path(folder)
    names = {"baseline": "baseline.mp4", "bwcache": "bwcache.mp4", "side_by_side": "side_by_side.mp4",
             "peer": "peer.mp4", "record": "run.json", "trace_csv": "trace.csv"}
    return {key: str(folder / name) for key, name in names.items() if (folder / name).is_file()}


def find_example(examples: list[dict], preset: str, prompt: str, threshold: Any, seed: Any) -> dict | None:
    for example in examples:
        record = example["record"]
        if (record["preset"] == preset and record["prompt"] == (prompt or "").strip()
                and _close(record["config"]["threshold"], threshold) and _close(record["seed"], seed)):
            return example
    return None


def _close(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    except (TypeError, ValueError):
        return False


def example_label(record: Mapping[str, Any]) -> str:
    config = record["config"]
    mode = "" if config["mode"] == "paper" else f" · {config['mode']}"
    interval = config.get("reuse_interval")
    reuse = f" · R {interval}" if interval is not None else ""
    profile = record.get("profile") or DEFAULT_PROFILE
    named = "" if profile == DEFAULT_PROFILE else f" · {profile} profile"
    return f"{record['prompt']} · δ {config['threshold']:g}{reuse}{mode}{named}"


def example_summary(record: Mapping[str, Any], summary: str) -> str:
    created = str(record.get("created", ""))
    when = f" on {created[:10]}" if len(created) >= 10 else ""
    return f"_Precomputed example, recorded{when}; press Run to time it on this machine._\n\n{summary}"
