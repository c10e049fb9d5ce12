"""Run records shaped for the app's views: the block × step heatmap, the threshold-tuning curve and the sweep's
table and plot."""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..config import CACHE_SETTINGS, BWCacheConfig
from ..figures import heatmap_figure, sweep_figure, tuning_figure
from ..schedule import EXACT_MODES
from ..settings import short_repr
from ..tuning import tuning_curve

# Heatmap views: key -> label shown in the app.
HEATMAP_VIEWS = {
    "uncached": "Uncached run: full distance map",
    "bwcache": "BWCache run: what it measured",
}
BRANCH_ORDER = ("cond", "uncond", "default")
# δ as the app offers it (its slider).
THRESHOLD_RANGE = CACHE_SETTINGS["threshold"].form_range


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
            figure = tuning_figure(tuning_curve(trace, config, block_share=share, upper=hi),
                                   mode=TUNING_MODES[config.mode], estimated=estimated, measured=measured)
            return figure, f"δ (threshold) must be a number from {lo:g} to {hi:g}, got {short_repr(threshold)}."
        if not lo <= chosen <= hi:
            # As the slider itself does once its box loses focus.
            clamped = min(max(chosen, lo), hi)
            note = f"δ = {chosen:g} is outside the allowed range {lo:g} to {hi:g}; the slider takes {clamped:g}. "
            chosen = clamped
    exact = tuning_curve(trace, config, thresholds=[chosen], block_share=share)[0]
    points = [p for p in tuning_curve(trace, config, block_share=share, upper=hi) if p["threshold"] != chosen]
    points.append(exact)
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


SWEEP_HEADERS = ["δ", "seconds", "speedup ×", "ideal speedup ×", "PSNR dB", "SSIM", "reuse %", "identical",
                 "trigger steps", "timing"]
# What a row's timing flag says: its speedup is far from what the skipped compute gives (`runner.timing_flag`).
TIMING_WORDS = {"below_ideal": "far below the ideal: the cache's own work or other load slowed the cached run",
                "above_ideal": "far above the ideal: other load slowed the uncached run; overstated"}


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
            TIMING_WORDS.get(row.get("timing_flag"), ""),
        ])
    return rows


def sweep_plot(result: Mapping[str, Any]):
    rows = [{**row, "psnr": math.inf if row["identical"] else row["psnr"]} for row in result["rows"]]
    return sweep_figure(rows, title=f"Speed vs fidelity (uncached {result['baseline_seconds']:.2f} s)")
