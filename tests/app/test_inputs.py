"""What users type is refused loudly where the model could not follow it: prompts the Tiny Shapes encoder cannot
read (instead of their words vanishing), negative prompts named as such, and over-long negative prompts."""

from __future__ import annotations

import pytest

from bwcache import ui
from bwcache.presets import load_preset
from bwcache.tiny import load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        ("!!! ???", "", "prompt has no word the Tiny Shapes model knows"),
        ("a red square 🙂 moving right", "", "prompt contains characters the Tiny Shapes text encoder cannot read: 🙂"),
        ("红色方块", "", "prompt contains characters the Tiny Shapes text encoder cannot read"),
        ("a red square moving right", "blurry", "negative prompt contains words outside the Tiny Shapes vocabulary: blurry"),
        ("a red square moving right", "???", "negative prompt has no word the Tiny Shapes model knows"),
    ],
)
def test_unreadable_prompts_are_refused_by_name(pipe, prompt, negative, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?")) as excinfo:
        pipe.encode_prompt(prompt, negative, True)
    assert prompt not in str(excinfo.value) or prompt == "a red square moving right"


def test_a_long_unknown_word_is_not_echoed_in_full(pipe):
    with pytest.raises(ValueError) as excinfo:
        pipe.encode_prompt("a red square moving right", "x" * 5000, True)
    assert len(str(excinfo.value)) < 300 and "negative prompt" in str(excinfo.value)


def test_an_empty_negative_prompt_is_the_unconditional_input(pipe):
    prompt_embeds, negative_embeds = pipe.encode_prompt("a red square moving right", "", True)
    assert negative_embeds.shape == prompt_embeds.shape


def test_a_negative_prompt_has_a_length_limit():
    preset = load_preset("tiny-shapes")
    limit = ui.NEGATIVE_PROMPT_MAX_CHARS
    ui.check_request(preset, negative_prompt="a " * (limit // 2))
    with pytest.raises(ValueError, match=f"negative prompt is {limit + 1} characters long; at most {limit}"):
        ui.check_request(preset, negative_prompt="a" * (limit + 1))


def test_a_run_that_reuses_nothing_says_why():
    from bwcache.report import no_reuse_hint, summary_markdown
    from bwcache.runner import run_comparison

    # The preset's 4 warm-up and 2 tail steps leave no step to reuse in 6: said before the run, in the record.
    with pytest.warns(UserWarning, match="with 6 steps, the 4 warm-up steps"):
        record = run_comparison("tiny-shapes", num_inference_steps=6, num_frames=8).record
    assert record["reuse_fraction"] == 0
    expected = "with 6 steps, the 4 warm-up steps (warmup_steps) and the 2 tail steps (tail_steps) leave no step"
    assert any(expected in note for note in record["warnings"]) and expected in summary_markdown(record)
    never = {**record, "config": {**record["config"], "mode": "paper", "reuse_interval": 1},
             "trigger_steps": {"cond": None}}
    assert f"the indicator never fell below δ={record['config']['threshold']:g}" in no_reuse_hint(never)
    assert no_reuse_hint({**record, "reuse_fraction": 0.2}) is None


def test_the_uncached_map_shows_its_own_indicator_labelled():
    from bwcache.figures import heatmap_figure
    from bwcache.runner import run_comparison

    record = run_comparison("tiny-shapes", num_inference_steps=12, num_frames=8, mode="paper", threshold=0.1).record
    figure = heatmap_figure(record["baseline_trace"], record["trace"], branch="cond")
    lines = {trace.name: trace for trace in figure.data if trace.type == "scatter"}
    uncached = lines["indicator (uncached run)"]
    assert all(v == v for v in uncached.y[1:])  # a value at every step after the first
    assert "indicator (BWCache run)" in lines
    own = heatmap_figure(record["trace"], branch="cond")
    assert "indicator" in {trace.name for trace in own.data}


def test_a_speedup_far_below_the_ideal_gets_a_timing_note():
    from bwcache.report import timing_note

    record = {"ideal_speedup": 2.0, "speedup": 0.79, "reuse_fraction": 0.5}
    assert "0.79× measured where the skipped work should give about 2.00×" in timing_note(record)
    assert timing_note({**record, "speedup": 1.8}) is None
    assert timing_note({**record, "reuse_fraction": 0.0}) is None


def test_few_step_and_short_runs_are_said_before_they_run():
    from bwcache import BWCacheConfig
    from bwcache.guardrails import no_room, schedule_warnings

    blockwise = BWCacheConfig(threshold=0.3, mode="blockwise", warmup_steps=2, tail_steps=1)
    assert no_room(blockwise, 3) and not no_room(blockwise, 4)
    assert no_room(BWCacheConfig(threshold=0.15, reuse_interval=3), 2)
    assert not no_room(BWCacheConfig(threshold=0.0, mode="blockwise", warmup_steps=9), 4)  # δ = 0 reuses nothing anyway
    # The official tail rule reuses nothing after a trigger at step 1 (tail int(1 · 0.5) = 0) but does after later
    # ones: with room for a later trigger, nothing is said; with 4 steps (R = 3) no trigger step leaves a reuse.
    assert no_room(BWCacheConfig.official(threshold=0.05), 30) is None
    assert "whatever step it triggers at" in no_room(BWCacheConfig.official(threshold=0.05), 4)
    few = schedule_warnings(blockwise, 6)
    assert len(few) == 1 and "6 steps is a few-step run" in few[0] and "calibrate" in few[0]
    tuned = schedule_warnings(blockwise, 12, tuned_steps=30)
    assert len(tuned) == 1 and "tuned at 30 steps and this run has 12" in tuned[0]
    assert schedule_warnings(blockwise, 30, tuned_steps=30) == []
