"""What each δ would do, read from an uncached run's distance map: the reuse it gives and the speedup that reuse
would bring if skipped blocks saved exactly their share of the time."""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import BWCacheConfig
from .schedule import largest_decision_distance, schedule_for


def ideal_speedup(reuse_fraction: float, block_share: float | None) -> float | None:
    """The speedup if skipping a share of block evaluations saved exactly that share of block time."""
    if block_share is None:
        return None
    return 1.0 / max(1e-9, 1.0 - reuse_fraction * min(1.0, block_share))


def largest_deciding_value(baseline_trace: dict, config: BWCacheConfig) -> float:
    """Above this δ every decision reuses: paper mode's largest indicator, block-wise mode's largest sum of
    distances a block decides on."""
    if config.mode == "paper":
        values = [v for branch in baseline_trace["branches"].values() for v in branch["indicator"] if v is not None]
        return max(values) if values else 0.0
    return largest_decision_distance(baseline_trace, config)


def tuning_curve(baseline_trace: dict, config: BWCacheConfig, thresholds=None, block_share: float | None = None,
                 upper: float | None = None):
    """δ → trigger (block-wise: first reuse) step, reuse fraction and predicted speedup, from an uncached trace, for
    the config's own mode: exact in paper and static mode, estimated in block-wise mode (`schedule_for`).

    Without `thresholds`, 41 δ up to just past the largest deciding value (where the curve changes), then on to
    `upper` (the δ slider's end) where the curve is flat.
    """
    if thresholds is None:
        top = largest_deciding_value(baseline_trace, config)
        top = top * 1.05 if top else 0.5
        grid = [np.linspace(0.0, top, 41), [config.threshold]]
        if upper is not None and upper > top:
            grid.append(np.linspace(top, upper, 6))
        thresholds = np.unique(np.concatenate(grid))
    points = []
    for delta in thresholds:
        predicted = schedule_for(baseline_trace, dataclasses.replace(config, threshold=float(delta)))
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
