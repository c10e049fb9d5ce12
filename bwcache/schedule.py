"""The paper-mode schedule, and its exact prediction from an uncached trace."""

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
        if any(any(row) for row in branch["reused"]):
            raise ValueError(
                f"Branch {name!r} of this trace already reuses features; predict_schedule needs the trace of an "
                "uncached run (threshold 0)."
            )
        num_steps = len(branch["indicator"])
        if config.num_inference_steps is not None and config.num_inference_steps != num_steps:
            raise ValueError(
                f"config.num_inference_steps={config.num_inference_steps} but the trace has {num_steps} steps."
            )
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
