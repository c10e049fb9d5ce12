"""The paper-mode schedule and its exact prediction from an uncached trace, and the block-wise mode's estimate."""

from __future__ import annotations

from .config import BWCacheConfig


def tail_length(trigger_step: int, tail_fraction: float, paper_tail_steps: int | None = None) -> int:
    """The tail's length n after a trigger at `trigger_step`, before any rule applies it: `paper_tail_steps`, or
    `int(k · tail_fraction)` as the official code computes it."""
    return paper_tail_steps if paper_tail_steps is not None else int(trigger_step * tail_fraction)


def paper_schedule(
    trigger_step: int | None,
    num_steps: int,
    reuse_interval: int,
    tail_fraction: float,
    paper_tail_steps: int | None = None,
    tail_rule: str = "guarded",
) -> list[bool]:
    """`computed[s]` for every step: R reused steps, one computed step, repeating after the trigger, and a computed tail.

    The tail of n = `tail_length(...)` steps: with `tail_rule="guarded"` the last max(1, n) steps; with
    `"official"` the official code's `cal_list[-n:] = 1`, where n = 0 selects the whole list (no reuse).

    >>> "".join("C" if c else "r" for c in paper_schedule(5, 30, 3, 0.5))
    'CCCCCCrrrCrrrCrrrCrrrCrrrCrrCC'
    """
    computed = [True] * num_steps
    if trigger_step is None:
        return computed
    for step in range(trigger_step + 1, num_steps):
        computed[step] = (step - trigger_step - 1) % (reuse_interval + 1) == reuse_interval
    tail = tail_length(trigger_step, tail_fraction, paper_tail_steps)
    if tail_rule == "official":
        computed[-tail:] = [True] * len(computed[-tail:])
    else:
        for step in range(max(0, num_steps - max(1, tail)), num_steps):
            computed[step] = True
    return computed


def config_schedule(config: BWCacheConfig, trigger_step: int | None, num_steps: int) -> list[bool]:
    """`paper_schedule` with a config's R, tail and tail rule."""
    return paper_schedule(
        trigger_step, num_steps, config.resolved_reuse_interval(num_steps), config.tail_fraction,
        config.paper_tail_steps, config.tail_rule,
    )


def find_trigger(indicator: list[float | None], threshold: float) -> int | None:
    """The first step k ≥ 1 whose indicator is below δ (step 0 has no previous step to compare with)."""
    for step, value in enumerate(indicator):
        if step >= 1 and value is not None and value < threshold:
            return step
    return None


def predict_schedule(trace_dict: dict, config: BWCacheConfig) -> dict:
    """The exact paper-mode schedule `config` would produce, from the trace of an uncached (or threshold-0) run.

    Exact because, up to its trigger step, a cached run computes exactly what the uncached run computed: the
    indicator values it sees are the recorded ones, and after the trigger the schedule no longer looks at them.
    When `config.indicator_blocks` differs from the recorded run's, the indicator is recomputed from the recorded
    per-block distances (those blocks must have been recorded).

    Returns `{"branches": {name: {"trigger_step", "computed", "reused", "reused_steps", "reuse_fraction"}},
    "reuse_fraction": ...}`, where `reused` is the step × block reuse matrix and `reuse_fraction` the share of
    block evaluations skipped.
    """
    if config.mode != "paper":
        raise ValueError(f"predict_schedule supports mode='paper' only, got mode={config.mode!r}.")
    num_blocks = trace_dict["num_blocks"]
    recorded = BWCacheConfig.from_dict(trace_dict["config"])
    if recorded.indicator_feature != config.indicator_feature:
        raise ValueError(
            f"The trace measured indicator_feature={recorded.indicator_feature!r}, the config asks for "
            f"{config.indicator_feature!r}: predict from an uncached trace of the same feature."
        )
    recorded_blocks = recorded.resolve_indicator_blocks(num_blocks)
    wanted_blocks = config.resolve_indicator_blocks(num_blocks)
    branches = {}
    skipped = total = 0
    for name, branch in trace_dict["branches"].items():
        num_steps = _uncached_steps(name, branch, config, "predict_schedule needs")
        if wanted_blocks == recorded_blocks:
            indicator = branch["indicator"]
        else:
            indicator = [_mean_over(row, wanted_blocks, name, step) for step, row in enumerate(branch["distance"])]
        trigger = find_trigger(indicator, config.threshold)
        computed = config_schedule(config, trigger, num_steps)
        reused_steps = sum(not c for c in computed)
        branches[name] = {
            "trigger_step": trigger,
            "computed": computed,
            "reused": [[not c] * num_blocks for c in computed],
            "reused_steps": reused_steps,
            "reuse_fraction": reused_steps / num_steps if num_steps else 0.0,
        }
        skipped += reused_steps * num_blocks
        total += num_steps * num_blocks
    return {"branches": branches, "reuse_fraction": skipped / total if total else 0.0}


def estimate_blockwise_schedule(trace_dict: dict, config: BWCacheConfig) -> dict:
    """An estimate of the block-wise schedule `config` would produce, from the trace of an uncached (threshold-0) run.

    Applies `bwcache.policies.BlockwisePolicy`'s rule to the recorded step-to-step distances: block i (an indicator
    block) reuses at step s when `warmup_steps ≤ s < T − tail_steps`, s ≥ 1, it has reused fewer than R consecutive
    steps, and its distance since it was last computed, taken as the sum of the recorded step-to-step distances
    since then, is below δ. That sum is what `accumulate_distance=True` decides on; without it, the run decides on
    the distance to the input it last computed, which the sum approximates (and, by the triangle inequality, mostly
    overstates). On Wan2.2's two experts each expert's steps are counted on their own, as the hooks count them.

    An estimate, not a prediction: a reuse changes every later input, so the cached run's distances after its first
    reuse differ from the recorded ones. Up to its first reuse the run is the uncached run, and the first decision
    after a computed step is on a single step-to-step distance, so the first reuse step is exact (where both runs
    measure the same tokens: a coarser `indicator_token_stride` moves distances slightly); so is the whole
    schedule when δ is at or below every distance that could decide (nothing is reused), or above every distance
    the run and the estimate decide on (R reused steps and one computed one, over and over). In between, a reused
    block hands the next block an input closer to its cached one, so the blocks after it tend to reuse too, which
    per-block distances cannot foresee: just above the smallest distances the estimate falls short.

    Returns the shape of `predict_schedule`: per branch `trigger_step` (the first step with a reuse, as block-wise
    traces record it), `computed` (every block ran), `reused` (the step × block matrix), `reused_steps` (steps
    with any reuse) and `reuse_fraction` (the share of the branch's block evaluations reused), and the overall
    `reuse_fraction`.
    """
    if config.mode != "blockwise":
        raise ValueError(
            f"estimate_blockwise_schedule supports mode='blockwise' only, got mode={config.mode!r}; paper mode is "
            "predicted exactly by predict_schedule."
        )
    recorded = BWCacheConfig.from_dict(trace_dict["config"])
    if recorded.indicator_feature != config.indicator_feature:
        raise ValueError(
            f"The trace measured indicator_feature={recorded.indicator_feature!r}, block-wise mode decides on "
            f"{config.indicator_feature!r}: estimate from an uncached trace of the same feature."
        )
    return _windowed_schedule(trace_dict, config, decide_on_distances=True)


def _windowed_schedule(trace_dict: dict, config: BWCacheConfig, decide_on_distances: bool) -> dict:
    """The block-wise rule over every branch; without `decide_on_distances` every reuse the rule allows is taken
    (static mode, which measures nothing)."""
    num_blocks = trace_dict["num_blocks"]
    blocks = config.resolve_indicator_blocks(num_blocks)
    branches = {}
    skipped = total = 0
    for name, branch in trace_dict["branches"].items():
        num_steps = _uncached_steps(name, branch, config, "the block-wise schedule is estimated from")
        reused = [[False] * num_blocks for _ in range(num_steps)]
        for start, end in _expert_windows(branch.get("experts"), num_steps):
            _window(branch["distance"], reused, start, end, blocks, config, name, decide_on_distances)
        reused_blocks = sum(sum(row) for row in reused)
        first = next((step for step, row in enumerate(reused) if any(row)), None)
        branches[name] = {
            "trigger_step": first,
            "computed": [not any(row) for row in reused],
            "reused": reused,
            "reused_steps": sum(any(row) for row in reused),
            "reuse_fraction": reused_blocks / (num_steps * num_blocks) if num_steps and num_blocks else 0.0,
        }
        skipped += reused_blocks
        total += num_steps * num_blocks
    return {"branches": branches, "reuse_fraction": skipped / total if total else 0.0}


def _expert_windows(experts, num_steps):
    """The steps each transformer took, as (start, end) runs: one run, or one per expert on Wan2.2."""
    if not experts or all(e is None for e in experts):
        return [(0, num_steps)]
    windows, start = [], 0
    for step in range(1, num_steps + 1):
        if step == num_steps or experts[step] != experts[start]:
            windows.append((start, step))
            start = step
    return windows


def _window(distance, reused, start, end, blocks, config, branch, decide_on_distances=True):
    """`BlockwisePolicy`'s decisions over one transformer's steps `start..end-1` (its own steps 0..T-1)."""
    if config.threshold == 0:
        return
    T = end - start
    R = config.resolved_reuse_interval(T)
    for i in blocks:
        consecutive, since = 0, 0.0
        for local in range(T):
            step = start + local
            # Step 0 (of this transformer) has no residual yet.
            if local >= 1 and config.warmup_steps <= local < T - config.tail_steps and consecutive < R:
                if not decide_on_distances:
                    reused[step][i] = True
                    consecutive += 1
                    continue
                value = distance[step][i]
                if value is None:
                    raise ValueError(
                        f"The trace has no distance for block {i} at step {step} of branch {branch!r}; estimate from "
                        "an uncached run that recorded every block's distance (threshold 0, all indicator blocks)."
                    )
                if since + value < config.threshold:
                    reused[step][i] = True
                    consecutive, since = consecutive + 1, since + value
                    continue
            consecutive, since = 0, 0.0


# Modes whose schedule the uncached trace gives exactly; block-wise mode's is estimated.
EXACT_MODES = ("paper", "static")


def schedule_for(trace_dict: dict, config: BWCacheConfig) -> dict:
    """The schedule `config` would produce, from an uncached trace, in the shape of `predict_schedule`: exact in
    paper mode (`predict_schedule`) and in static mode (block-wise mode's schedule with every reuse its rule allows,
    which no distance decides), estimated in block-wise mode (`estimate_blockwise_schedule`)."""
    if config.mode == "paper":
        return predict_schedule(trace_dict, config)
    if config.mode == "blockwise":
        return estimate_blockwise_schedule(trace_dict, config)
    if config.mode == "static":
        return _windowed_schedule(trace_dict, config, decide_on_distances=False)
    raise ValueError(f"No schedule from a trace for mode={config.mode!r}; modes: paper, blockwise, static.")


def _uncached_steps(name: str, branch: dict, config: BWCacheConfig, use: str) -> int:
    """The step count of an uncached branch, checked: nothing reused, as many steps as the config says."""
    if any(any(row) for row in branch["reused"]):
        raise ValueError(
            f"Branch {name!r} of this trace already reuses features; {use} the trace of an uncached run (threshold 0)."
        )
    num_steps = len(branch["distance"])
    if config.num_inference_steps is not None and config.num_inference_steps != num_steps:
        raise ValueError(f"config.num_inference_steps={config.num_inference_steps} but the trace has {num_steps} steps.")
    return num_steps


def _mean_over(row, blocks, branch, step):
    if step == 0:
        return None
    values = [row[i] for i in blocks]
    if any(v is None for v in values):
        missing = [i for i in blocks if row[i] is None]
        raise ValueError(
            f"The trace has no distance for block(s) {missing} at step {step} of branch {branch!r}; record it with "
            "those blocks among indicator_blocks."
        )
    return sum(values) / len(values)


def largest_decision_distance(trace: dict, config: BWCacheConfig) -> float:
    """The largest sum of up to R consecutive step-to-step distances of an indicator block: above it, every block
    reuses wherever the block-wise rule lets it (the estimate no longer changes with δ)."""
    blocks = config.resolve_indicator_blocks(trace["num_blocks"])
    largest = 0.0
    for branch in trace["branches"].values():
        rows = branch["distance"]
        reuse = config.resolved_reuse_interval(len(rows))
        for i in blocks:
            column = [row[i] or 0.0 for row in rows]
            for step in range(len(column)):
                largest = max(largest, sum(column[max(0, step - reuse + 1): step + 1]))
    return largest
