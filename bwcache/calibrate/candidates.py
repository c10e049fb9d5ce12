"""What a calibration may choose from, and how each choice is ranked before anything runs.

From the uncached (threshold-0) traces of the calibration prompts, every candidate config gets

* the block compute it would skip, from `bwcache.schedule.schedule_for`: exact in paper and static mode, estimated in
  block-wise mode;
* a fidelity proxy, the *weighted drift* of its reuses: for every block evaluation the schedule reuses (block i at
  step s, its residual last computed at step c), how far the block's input moved since c, taken as the sum of the
  recorded step-to-step distances d(c+1..s, i), less what an extrapolation e predicts from the move before c
  (e · d(c0+1..c, i) · (t_s − t_c)/(t_c − t_c0), c0 the computed step before c), weighted by the step's noise level
  t_s / t_0 (an error while the clip is laid out costs more than one in the last details). A reused residual is wrong
  by about how much its block's input moved, and the video by what those errors add up to.

Measured on the embedded model (`benchmarks/calibration_proxy.py`: 34 candidates of the three modes, 3 prompts), the
proxy ranks real runs' PSNR with a Spearman correlation of 0.94 (compute skipped alone: 0.75; without the
extrapolation's correction 0.81), and PSNR ≈ a − 18.6 · log10(proxy) with a residual spread of 2.3 dB: good enough to
choose which few candidates to run, not to promise a PSNR, which only the runs measure.
These figures are from one run of that script; its results file is not in benchmarks/results/ yet.

The candidates span the three modes and their knobs; settings counted in steps (warm-up, tail, R) are chosen as
fractions of the step count, so that a profile made at one step count scales to another (`bwcache.calibrate.profile`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import BWCacheConfig
from ..schedule import schedule_for

# Share of the steps always computed first (static and block-wise modes) and last.
WARMUP_FRACTIONS = (0.1, 0.15, 0.2, 0.25)
TAIL_FRACTIONS = (0.03, 0.07)
# Most consecutive reused steps, as steps (those above a quarter of the steps are left out).
REUSE_INTERVALS = (1, 2, 3, 4)
EXTRAPOLATIONS = (0.0, 0.5)
# Paper mode: tails (as a share of the trigger step) and R ("auto": 10% of the steps).
PAPER_TAILS = (0.5,)
PAPER_INTERVALS = (1, 2, 3, None)
# Block-wise mode's δ, as quantiles of the distances its decisions compare with δ.
BLOCKWISE_QUANTILES = (0.5, 0.8)
# Paper mode's δ: at most this many, spread over the recorded indicator values (each value is a possible trigger).
PAPER_THRESHOLDS = 8


@dataclass
class Candidate:
    """A config, and what the uncached traces say of it."""

    config: BWCacheConfig
    # Share of block evaluations skipped, averaged over the prompts' traces.
    predicted_skipped: float = 0.0
    # The weighted drift of its reuses, averaged over the prompts' traces (lower: closer to the uncached video).
    proxy: float = 0.0
    exact: bool = True  # whether `predicted_skipped` is exact (paper, static) or estimated (block-wise)
    per_prompt: list[dict] = field(default_factory=list, repr=False)

    @property
    def key(self) -> tuple:
        return config_key(self.config)


def config_key(config: BWCacheConfig) -> tuple:
    """Configs that run the same (the trace and step count aside) share a key."""
    data = config.to_dict()
    data.pop("record_trace", None)
    data.pop("num_inference_steps", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in data.items()))


def steps_from_fraction(fraction: float, num_steps: int, minimum: int = 0) -> int:
    """A count of steps from a share of the step count (rounded, at least `minimum`)."""
    return max(minimum, int(round(fraction * num_steps)))


def candidate_configs(traces: list[dict], base: BWCacheConfig, num_steps: int,
                      modes: tuple[str, ...] = ("paper", "static", "blockwise")) -> list[BWCacheConfig]:
    """The configs a calibration ranks, deduplicated: paper mode at δ between the recorded indicator values (each a
    different trigger step); static and block-wise modes over warm-up and tail fractions, R and extrapolation (and in
    block-wise mode δ at quantiles of its decision distances, and every other block as the only ones that may
    reuse). Every config keeps `base`'s storage, feature and token stride."""
    T = num_steps
    keep = dict(num_inference_steps=T, indicator_token_stride=base.indicator_token_stride,
                cache_dtype=base.cache_dtype, record_trace=True)
    configs: list[BWCacheConfig] = []
    intervals = [r for r in REUSE_INTERVALS if r == 1 or r <= max(1, T // 4)]
    warmups = sorted({steps_from_fraction(f, T, minimum=1) for f in WARMUP_FRACTIONS})
    tails = sorted({steps_from_fraction(f, T, minimum=1) for f in TAIL_FRACTIONS})
    if "paper" in modes:
        for delta in paper_thresholds(traces):
            for r in PAPER_INTERVALS:
                for tail in PAPER_TAILS:
                    for e in EXTRAPOLATIONS:
                        configs.append(BWCacheConfig(mode="paper", threshold=delta, reuse_interval=r,
                                                     tail_fraction=tail, extrapolation=e, **keep))
    windowed = [(w, t, r, e) for w in warmups for t in tails for r in intervals for e in EXTRAPOLATIONS
                if w + t < T]
    if "static" in modes:
        for w, t, r, e in windowed:
            for blocks in (None, "every_other"):
                configs.append(BWCacheConfig(mode="static", threshold=1.0, warmup_steps=w, tail_steps=t,
                                             reuse_interval=r, extrapolation=e, indicator_blocks=blocks, **keep))
    if "blockwise" in modes:
        for w, t, r, e in windowed:
            probe = BWCacheConfig(mode="blockwise", warmup_steps=w, tail_steps=t, reuse_interval=r, **keep)
            for delta in blockwise_thresholds(traces, probe):
                configs.append(dataclasses.replace(probe, threshold=delta, extrapolation=e))
    unique: dict[tuple, BWCacheConfig] = {}
    for config in configs:
        unique.setdefault(config_key(config), config)
    return list(unique.values())


def paper_thresholds(traces: list[dict]) -> list[float]:
    """δ just above recorded indicator values (so each triggers at a different step on some prompt), at most
    `PAPER_THRESHOLDS` of them, spread over the values' ranks."""
    values = sorted({v for trace in traces for branch in trace["branches"].values()
                     for step, v in enumerate(branch["indicator"]) if step >= 1 and v is not None and v > 0})
    if not values:
        return []
    if len(values) > PAPER_THRESHOLDS:
        picks = [values[round(k * (len(values) - 1) / (PAPER_THRESHOLDS - 1))] for k in range(PAPER_THRESHOLDS)]
        values = sorted(set(picks))
    return [float(f"{v * 1.0001:.6g}") for v in values]


def blockwise_thresholds(traces: list[dict], config: BWCacheConfig) -> list[float]:
    """δ at quantiles of the sums of consecutive step-to-step distances (as many as R) that block-wise mode's
    decisions compare with δ, within its reuse window."""
    sums = []
    for trace in traces:
        blocks = config.resolve_indicator_blocks(trace["num_blocks"])
        for branch in trace["branches"].values():
            rows = branch["distance"]
            T = len(rows)
            R = config.resolved_reuse_interval(T)
            for i in blocks:
                column = [row[i] for row in rows]
                for s in range(max(1, config.warmup_steps), T - config.tail_steps):
                    window = [v for v in column[max(1, s - R + 1): s + 1] if v is not None]
                    if window:
                        sums.append(sum(window))
    if not sums:
        return []
    sums.sort()
    return sorted({float(f"{sums[min(len(sums) - 1, int(q * len(sums)))]:.4g}") for q in BLOCKWISE_QUANTILES})


def rank(configs: list[BWCacheConfig], traces: list[dict]) -> list[Candidate]:
    """Each config's predicted compute skipped and fidelity proxy, averaged over the traces (one per prompt)."""
    candidates = []
    for config in configs:
        per_prompt = []
        for trace in traces:
            schedule = schedule_for(trace, config)
            per_prompt.append({"skipped": schedule["reuse_fraction"], "proxy": drift_proxy(trace, schedule, config)})
        candidates.append(Candidate(
            config=config,
            predicted_skipped=sum(p["skipped"] for p in per_prompt) / len(per_prompt),
            proxy=sum(p["proxy"] for p in per_prompt) / len(per_prompt),
            exact=config.mode in ("paper", "static"),
            per_prompt=per_prompt,
        ))
    return candidates


WEIGHTINGS = ("noise", "trajectory", "none")
# dB of PSNR lost per tenfold proxy, as measured on the embedded model (the search's prior slope).
PROXY_SLOPE = 18.6


def step_weights(timesteps: list, num_steps: int, weighting: str = "noise") -> list[float]:
    """How much an error at each step counts: `"noise"`, the step's noise level t_s / t_0; `"trajectory"`, the step's
    share of the sampling trajectory |t_s − t_{s+1}| / t_0 (the last step runs to 0); `"none"`, 1 / T each (also
    where the trace has no timesteps)."""
    times = list(timesteps or [])[:num_steps]
    if (weighting == "none" or len(times) < num_steps or any(t is None for t in times) or not times
            or not times[0]):
        return [1.0 / max(1, num_steps)] * num_steps
    times = [float(t) for t in times] + [0.0]
    span = abs(times[0])
    if weighting == "noise":
        return [abs(times[s]) / span for s in range(num_steps)]
    return [abs(times[s] - times[s + 1]) / span for s in range(num_steps)]


def drift_proxy(trace: dict, schedule: dict, config: BWCacheConfig, weighting: str = "noise",
                extrapolated: bool = True) -> float:
    """The weighted drift of a schedule's reuses (see the module docstring), summed over blocks, steps and branches.

    `weighting` (`WEIGHTINGS`) and `extrapolated=False` (the extrapolation ignored) are the variants the study
    compares."""
    total = 0.0
    e = config.extrapolation if extrapolated else 0.0
    for name, branch in trace["branches"].items():
        distance = branch["distance"]
        reused = schedule["branches"][name]["reused"]
        T = len(distance)
        weights = step_weights(branch.get("timesteps"), T, weighting)
        times = branch.get("timesteps") or [None] * T
        for i in range(trace["num_blocks"]):
            computed: list[int] = []  # this block's computed steps so far
            drift = 0.0  # the distance its input moved since its last computed step
            for s in range(T):
                d = distance[s][i]
                step_move = 0.0 if d is None or not math.isfinite(d) else d
                if not reused[s][i]:
                    computed.append(s)
                    drift = 0.0
                    continue
                drift += step_move
                error = drift
                if e > 0 and len(computed) >= 2:
                    c0, c = computed[-2], computed[-1]
                    before = sum((distance[u][i] or 0.0) for u in range(c0 + 1, c + 1))
                    ratio = _time_ratio(times, c0, c, s)
                    error = abs(drift - e * before * ratio)
                total += weights[s] * error
    return total


def _time_ratio(times, c0: int, c: int, s: int) -> float:
    """(t_s − t_c)/(t_c − t_c0), or the same in steps where the trace has no timesteps."""
    if None not in (times[c0], times[c], times[s]) and times[c] != times[c0]:
        return (float(times[s]) - float(times[c])) / (float(times[c]) - float(times[c0]))
    return (s - c) / (c - c0)


def frontier(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both counts (more compute skipped and a lower proxy), by compute skipped;
    among equal points, exact modes first (paper, static: their schedule is known before running)."""
    ordered = sorted(candidates, key=lambda c: (-c.predicted_skipped, c.proxy, not c.exact))
    kept: list[Candidate] = []
    best_proxy = math.inf
    for candidate in ordered:
        if candidate.predicted_skipped <= 0:
            continue
        if candidate.proxy < best_proxy - 1e-12:
            kept.append(candidate)
            best_proxy = candidate.proxy
    return sorted(kept, key=lambda c: c.predicted_skipped)
