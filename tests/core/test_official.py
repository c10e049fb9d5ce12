"""`BWCacheConfig.official(...)` takes exactly the official code's decisions, and `indicator_feature="modulated"`
measures what the official code measures.

The official logic is simulated here from its published semantics (hsc113/BWCache as its Wan2.2 and MLX ports run
it), without calling BWCache's schedule code: per computed step an indicator (a sentinel of 1000 at step 0 and after
the trigger), a one-shot trigger at the first step below δ, then `([0]*R + [1])` repeating and
`cal[-int(tail_start):] = 1` with `tail_start = k·last_step if last_step < 1 else last_step`.
"""

from __future__ import annotations

import pytest
import torch

from bwcache import BWCacheConfig, apply_bwcache, predict_schedule
from bwcache.blocks import find_blocks
from bwcache.tiny import load_pipeline
from testing_utils.families import FAMILIES, run_steps

SENTINEL = 1000.0


def official_cal_list(indicator: list[float | None], thresh: float, reuse_interval: int, last_step: float):
    """(cal_list, trigger step) of one branch, as the official loop computes them from per-step indicators."""
    num_steps = len(indicator)
    cal = [1] * num_steps
    updated, trigger = False, None
    for step in range(num_steps):
        if cal[step] == 0:
            continue  # a reused step runs no block and measures nothing
        acu = SENTINEL if step == 0 or updated else indicator[step]
        if not updated and acu < thresh:
            pattern = [0] * reuse_interval + [1]
            new = [1] * num_steps
            for i in range(step + 1, num_steps):
                new[i] = pattern[(i - (step + 1)) % (reuse_interval + 1)]
            tail_start = step * last_step if last_step < 1 else last_step
            new[-int(tail_start):] = [1] * len(new[-int(tail_start):])
            cal, updated, trigger = new, True, step
    return cal, trigger


def synthetic_trace(indicators: dict[str, list[float | None]]) -> dict:
    """An uncached one-block trace with the given indicator per branch."""
    return {
        "config": BWCacheConfig(threshold=0.0, indicator_feature="modulated").to_dict(),
        "num_blocks": 1,
        "branches": {
            name: {"indicator": values, "distance": [[v] for v in values], "reused": [[False]] * len(values),
                   "trigger_step": None, "timesteps": [None] * len(values)}
            for name, values in indicators.items()
        },
    }


TAILS = (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99, 1, 2, 3, 5, 10, 2.5)


def test_predict_schedule_of_official_matches_the_simulation_everywhere():
    """Every T of 10–60, R of 1–12, tail (fractions and absolute) and trigger step (and no trigger)."""
    threshold, checked = 0.5, 0
    for num_steps in range(10, 61):
        # Branch "k<k>" first falls below δ at step k; "never" stays above.
        indicators = {f"k{k}": [None] + [0.9] * (k - 1) + [0.1] + [0.9, 0.1] * num_steps for k in range(1, num_steps)}
        indicators = {name: values[:num_steps] for name, values in indicators.items()}
        indicators["never"] = [None] + [0.9] * (num_steps - 1)
        trace = synthetic_trace(indicators)
        for reuse_interval in range(1, 13):
            for last_step in TAILS:
                config = BWCacheConfig.official(threshold=threshold, reuse_interval=reuse_interval, last_step=last_step)
                predicted = predict_schedule(trace, config)["branches"]
                for name, values in indicators.items():
                    cal, trigger = official_cal_list(values, threshold, reuse_interval, last_step)
                    assert predicted[name]["computed"] == [bool(c) for c in cal], (num_steps, reuse_interval, last_step, name)
                    assert predicted[name]["trigger_step"] == trigger
                    checked += 1
    assert checked > 250_000


def test_the_official_k1_quirk_and_the_default_guard_differ_as_documented():
    indicator = [None] + [0.01] * 29
    cal, trigger = official_cal_list(indicator, 0.15, 3, 0.5)
    assert trigger == 1 and all(cal)  # [-0:] selects the whole list: nothing reused
    trace = synthetic_trace({"cond": indicator})
    official = predict_schedule(trace, BWCacheConfig.official())["branches"]["cond"]
    guarded = predict_schedule(trace, BWCacheConfig(threshold=0.15, reuse_interval=3, indicator_feature="modulated"))
    guarded = guarded["branches"]["cond"]
    assert official["reused_steps"] == 0
    assert "".join("C" if c else "r" for c in guarded["computed"]) == "CCrrrCrrrCrrrCrrrCrrrCrrrCrrrC"


def test_official_config_fields():
    config = BWCacheConfig.official()
    assert (config.mode, config.indicator_feature, config.tail_rule) == ("paper", "modulated", "official")
    assert (config.threshold, config.reuse_interval, config.tail_fraction, config.paper_tail_steps) == (0.15, 3, 0.5, None)
    absolute = BWCacheConfig.official(last_step=4)
    assert absolute.paper_tail_steps == 4
    assert BWCacheConfig.official(record_trace=False).record_trace is False
    with pytest.raises(ValueError, match="last_step must be a finite number ≥ 0"):
        BWCacheConfig.official(last_step=-1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(indicator_feature="attn"), "indicator_feature must be one of"),
        (dict(indicator_feature="modulated", mode="blockwise"), "paper mode only"),
        (dict(tail_rule="python"), "tail_rule must be one of"),
        (dict(paper_tail_steps=0), "paper_tail_steps must be an integer ≥ 1"),
        (dict(paper_tail_steps=1.5), "paper_tail_steps must be an integer ≥ 1"),
    ],
)
def test_bad_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        BWCacheConfig(**fields)


def test_default_reuse_interval_is_a_tenth_rounded_up():
    config = BWCacheConfig()
    assert [config.resolved_reuse_interval(t) for t in (1, 9, 10, 11, 15, 25, 30, 31, 50)] == [1, 1, 1, 2, 2, 3, 3, 4, 5]


# -- on the embedded model -------------------------------------------------------------------------------------

STEPS = 20
SETTINGS = dict(prompt="a blue circle moving left", num_frames=8, num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    return pipe(**SETTINGS, generator=torch.Generator().manual_seed(0)).frames[0]


@pytest.fixture(scope="module")
def captured(pipe):
    """Per branch, the official indicator of each step from the attention inputs, taken by plain pre-hooks."""
    blocks = find_blocks(pipe.transformer)
    inputs, calls = {}, [0]

    def count_call(module, args, kwargs):
        calls[0] += 1

    def keep(index):
        def pre(module, args):
            inputs.setdefault(calls[0] - 1, {})[index] = args[0].detach().float().clone()

        return pre

    handles = [pipe.transformer.register_forward_pre_hook(count_call, with_kwargs=True)]
    handles += [spec.module.attn1.register_forward_pre_hook(keep(spec.index)) for spec in blocks]
    try:
        generate(pipe)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == 2 * STEPS  # TinyShapesPipeline calls cond, then uncond, at every step
    indicators = {}
    for offset, branch in enumerate(("cond", "uncond")):
        steps = [inputs[2 * s + offset] for s in range(STEPS)]
        values = [None]
        for s in range(1, STEPS):
            distances = [
                ((steps[s][i] - steps[s - 1][i]).abs().mean() / steps[s - 1][i].abs().mean()).item()
                for i in range(len(blocks))
            ]
            values.append(sum(distances) / len(blocks))
        indicators[branch] = values
    return indicators


def thresholds(indicators: dict) -> dict[str, float]:
    """δ for a trigger at step 1 (every indicator below it), mid-run, and never (below every value).

    Mid-run, every branch triggers at the same step k ≥ 2: once one branch reuses, the shared latents change and
    the other branch's later distances are no longer the uncached ones the simulation is fed."""
    branches = list(indicators.values())
    for k in range(2, STEPS - 2):
        low = max(indicator[k] for indicator in branches)
        high = min(min(indicator[1:k]) for indicator in branches)
        if low < high:
            mid_run = (low + high) / 2
            break
    else:
        raise AssertionError("no step where one threshold triggers every branch")
    lowest = min(v for indicator in branches for v in indicator[1:])
    return {"step 1": 10.0, "mid-run": mid_run, "never": lowest / 2}


def test_official_runtime_decisions_match_the_simulation_on_the_embedded_model(pipe, captured):
    expected_triggers = {}
    for label, delta in thresholds(captured).items():
        with_cache = BWCacheConfig.official(threshold=delta)
        handle = apply_bwcache(pipe, with_cache)
        try:
            generate(pipe)
        finally:
            handle.remove()
        trace = handle.trace.to_dict()
        assert trace["config"]["indicator_feature"] == "modulated"
        for branch, indicator in captured.items():
            cal, trigger = official_cal_list(indicator, delta, 3, 0.5)
            recorded = trace["branches"][branch]
            assert recorded["trigger_step"] == trigger, (label, branch)
            assert [not any(row) for row in recorded["reused"]] == [bool(c) for c in cal], (label, branch)
            # Before the trigger the cache measured what the plain hooks saw.
            stop = STEPS if trigger is None else trigger + 1
            assert recorded["indicator"][1:stop] == pytest.approx(indicator[1:stop], rel=1e-4)
            expected_triggers[(label, branch)] = trigger
    assert {expected_triggers[("step 1", b)] for b in captured} == {1}
    assert len({expected_triggers[("mid-run", b)] for b in captured}) == 1
    assert 2 <= expected_triggers[("mid-run", "cond")] < STEPS - 2
    assert {expected_triggers[("never", b)] for b in captured} == {None}


def test_modulated_feature_differs_from_the_hidden_states_input(pipe, captured):
    handle = apply_bwcache(pipe, BWCacheConfig(threshold=0.0))
    try:
        generate(pipe)
    finally:
        handle.remove()
    hidden = handle.trace.to_dict()["branches"]["cond"]["indicator"]
    assert hidden[1:] != pytest.approx(captured["cond"][1:], rel=1e-3)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_measures_its_modulated_input_at_threshold_zero(name):
    family = FAMILIES[name]
    model = family.build()
    reference = run_steps(model, family, 4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0, indicator_feature="modulated"))
    cached = run_steps(model, family, 4)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert all(v is not None and v > 0 for row in branch["distance"][1:] for v in row)


def test_an_unknown_block_class_is_named():
    class PlainBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1 = torch.nn.Linear(4, 4)

        def forward(self, hidden_states):
            return self.attn1(hidden_states)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([PlainBlock(), PlainBlock()])

        def forward(self, hidden_states):
            for block in self.blocks:
                hidden_states = block(hidden_states)
            return hidden_states

    from bwcache import register_block

    register_block(PlainBlock)
    with pytest.raises(ValueError, match="PlainBlock .* block blocks.0"):
        apply_bwcache(Model(), BWCacheConfig(indicator_feature="modulated"))


def test_a_comparison_measures_both_runs_on_the_chosen_feature(pipe):
    from bwcache import ui
    from bwcache.runner import run_comparison

    record = run_comparison("tiny-shapes", num_inference_steps=8, num_frames=8, mode="paper", threshold=0.1,
                            indicator_feature="modulated", pipe=pipe).record
    assert record["config"]["indicator_feature"] == "modulated"
    # The uncached run's distance map (the tuning curve's source) is of the same feature.
    assert record["baseline_trace"]["config"]["indicator_feature"] == "modulated"
    assert "modulated attention input" in ui.heatmap(record).layout.title.text
    assert "modulated attention input" in ui.heatmap(record, view="cached").layout.title.text


def test_the_app_refuses_bad_feature_settings():
    from bwcache import ui
    from bwcache.presets import load_preset

    preset = load_preset("tiny-shapes")
    with pytest.raises(ValueError, match="Indicator feature must be one of hidden_states, modulated"):
        ui.check_request(preset, indicator_feature="attention")
    # The preset's default mode is block-wise, where the modulated input cannot decide.
    with pytest.raises(ValueError, match="paper mode only"):
        ui.check_request(preset, indicator_feature="modulated")
    assert ui.check_request(preset, indicator_feature="modulated", mode="paper")["indicator_feature"] == "modulated"


def test_a_prediction_needs_a_trace_of_the_same_feature():
    trace = synthetic_trace({"cond": [None] + [0.01] * 9})
    with pytest.raises(ValueError, match="measured indicator_feature='modulated'"):
        predict_schedule(trace, BWCacheConfig(threshold=0.15))
