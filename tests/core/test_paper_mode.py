"""Paper mode on a dummy transformer whose numbers are worked out by hand."""

import pytest
import torch

from bwcache import BWCacheConfig, apply_bwcache, paper_schedule, predict_schedule, remove_bwcache
from testing_utils.dummy import DoublingTransformer, dyadic, run_dummy, step_dummy


def pattern(computed):
    return "".join("C" if c else "r" for c in computed)


def reference_paper(values, num_steps, num_blocks, delta, reuse, tail_fraction):
    """Paper mode on the doubling dummy, by counting reused steps rather than by the modulo formula."""
    outputs, kinds, previous, trigger, last_input = [], [], None, None, None
    since_compute = 0
    for s in range(num_steps):
        a = values(s)
        in_tail = trigger is not None and s >= num_steps - max(1, int(trigger * tail_fraction))
        reuse_now = trigger is not None and not in_tail and since_compute < reuse
        if reuse_now:
            since_compute += 1
            outputs.append(a + (2**num_blocks * last_input - last_input))
            kinds.append("r")
            continue
        since_compute = 0
        outputs.append(2**num_blocks * a)
        kinds.append("C")
        last_input = a
        if trigger is None and previous is not None and abs(a - previous) / abs(previous) < delta:
            trigger = s
        previous = a
    return outputs, "".join(kinds), trigger


def test_worked_examples_from_the_reference():
    assert pattern(paper_schedule(5, 30, 3, 0.5)) == "CCCCCCrrrCrrrCrrrCrrrCrrrCrrCC"
    assert pattern(paper_schedule(10, 30, 3, 0.5)) == "CCCCCCCCCCCrrrCrrrCrrrCrrCCCCC"
    # k = 1: floor(0.5) = 0 would disable all reuse; at least the final step is computed instead.
    assert pattern(paper_schedule(1, 30, 3, 0.5)) == "CCrrrCrrrCrrrCrrrCrrrCrrrCrrrC"
    assert pattern(paper_schedule(None, 5, 3, 0.5)) == "CCCCC"


def test_distances_indicator_and_trigger_are_exact():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0))
    run_dummy(model, 6)
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert branch["distance"][0] == [None] * 4
    for s in range(1, 6):
        expected = (dyadic(s) - dyadic(s - 1)) / dyadic(s - 1)
        assert branch["distance"][s] == pytest.approx([expected] * 4, rel=1e-6)
        assert branch["indicator"][s] == pytest.approx(expected, rel=1e-6)
    assert branch["trigger_step"] is None
    assert branch["timesteps"] == [1000.0 - s for s in range(6)]


@pytest.mark.parametrize("delta,reuse,tail", [(0.1, 2, 0.5), (0.2, 3, 0.5), (0.05, 1, 1.0), (0.3, 4, 0.0)])
def test_outputs_and_schedule_match_an_independent_reference(delta, reuse, tail):
    steps = 14
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=delta, reuse_interval=reuse, tail_fraction=tail))
    outputs = run_dummy(model, steps)
    expected, kinds, trigger = reference_paper(dyadic, steps, 4, delta, reuse, tail)
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert branch["trigger_step"] == trigger
    assert "".join("r" if all(row) else "C" for row in branch["reused"]) == kinds
    for out, value in zip(outputs, expected):
        assert torch.equal(out[0], torch.full((1, 4, 8), value))


def test_exact_numbers_at_delta_0_1():
    # Relative changes 0.5, 1/6, 1/14, 1/30, …: the first below 0.1 is at step 3.
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2, tail_fraction=0.5))
    outputs = run_dummy(model, 12)
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert branch["trigger_step"] == 3
    assert "".join("r" if all(row) else "C" for row in branch["reused"]) == "CCCCrrCrrCrC"
    # Step 4 reuses step 3's whole-stack residual: 1.9375 + (16 − 1) · 1.875.
    assert outputs[4][0].unique().tolist() == [30.0625]
    assert outputs[6][0].unique().tolist() == [16 * dyadic(6)]
    assert handle.trace.reuse_fraction == pytest.approx(5 / 12)
    # Distances are recorded up to the trigger only: no indicator work after it.
    assert all(v is None for row in branch["distance"][4:] for v in row)
    assert all(v is None for v in branch["indicator"][4:])


def test_dual_stream_blocks_reuse_both_streams():
    model = DoublingTransformer(num_layers=3, dual_stream=True)
    apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2))
    outputs = run_dummy(model, 8, encoder=True)
    # Trigger at 3, step 4 reused: each stream adds its own residual (2^3 − 1) · input at step 3.
    hidden, encoder = outputs[4]
    assert hidden.unique().tolist() == [dyadic(4) + 7 * dyadic(3)]
    assert encoder.unique().tolist() == [dyadic(4) / 2 + 7 * dyadic(3) / 2]


def test_one_residual_per_branch_and_features_freed_after_trigger():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2))
    for step in range(5):
        step_dummy(model, step, 12)
    state = handle._hook.state_manager._state_cache["cond"]
    assert state.trigger_step == 3
    assert list(state.residuals) == [0]  # the four blocks form one chain
    assert state.features == [None] * 4


def test_before_the_trigger_no_residual_is_kept():
    # Until a step triggers, the next step is computed: its residual would never be read.
    model = DoublingTransformer(num_layers=3)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.01, reuse_interval=2))
    for step in range(4):
        step_dummy(model, step, 12)
        state = handle._hook.state_manager._state_cache["cond"]
        assert state.trigger_step is None and state.residuals == {} and state.chain_start is None
        assert all(f is not None for f in state.features)


def test_tail_frees_the_residual():
    model = DoublingTransformer(num_layers=2)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2))
    for step in range(12):
        step_dummy(model, step, 12)
    state = handle._hook.state_manager._state_cache["cond"]
    assert state.residuals == {}


def test_cfg_branches_are_independent():
    def other(step):
        return 1.0 + step  # relative changes 1, 1/2, 1/3, …

    model = DoublingTransformer(num_layers=3)
    config = BWCacheConfig(threshold=0.3, reuse_interval=2)
    handle = apply_bwcache(model, config)
    steps = 10
    cond_alone = run_dummy(model, steps)
    cond_trace = handle.trace.to_dict()["branches"]["cond"]

    cond, uncond = [], []
    for step in range(steps):
        for name, values, sink in (("cond", dyadic, cond), ("uncond", other, uncond)):
            with model.cache_context(name, step_index=step, num_inference_steps=steps):
                sink.append(model(torch.full((1, 4, 8), values(step)), timestep=torch.tensor([1000.0 - step])))
    trace = handle.trace.to_dict()["branches"]
    assert trace["cond"] == cond_trace
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cond, cond_alone))
    assert trace["cond"]["trigger_step"] == 2
    assert trace["uncond"]["trigger_step"] == 4  # 1/4 < 0.3 first at step 4
    expected, _, _ = reference_paper(other, steps, 3, 0.3, 2, 0.5)
    assert [o[0].unique().item() for o in uncond] == expected


def test_no_context_runs_one_default_branch_counting_steps():
    model = DoublingTransformer(num_layers=2)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2, num_inference_steps=8))
    run_dummy(model, 8, context=None)
    trace = handle.trace.to_dict()
    assert list(trace["branches"]) == ["default"]
    assert trace["branches"]["default"]["trigger_step"] == 3
    # A ninth call starts the next generation.
    run_dummy(model, 8, context=None)
    assert len(handle.trace.to_dict()["branches"]["default"]["indicator"]) == 8


def test_missing_step_count_is_a_clear_error():
    model = DoublingTransformer(num_layers=2)
    apply_bwcache(model, BWCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="num_inference_steps"):
        with model.cache_context("cond"):
            model(torch.ones(1, 4, 8))


def test_two_generations_in_a_row_are_identical_and_the_trace_survives_the_reset():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2))
    first = run_dummy(model, 12)  # ends with the pipeline-style reset
    first_trace = handle.trace.to_dict()
    assert first_trace["branches"]["cond"]["trigger_step"] == 3
    second = run_dummy(model, 12)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert handle.trace.to_dict() == first_trace
    handle.reset()
    assert handle.trace.to_dict()["branches"] == {}


def test_predict_schedule_is_exact_on_the_dummy():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0))
    run_dummy(model, 16)
    uncached = handle.trace.to_dict()
    remove_bwcache(model)
    for delta in (0.01, 0.05, 0.1, 0.2, 0.6):
        config = BWCacheConfig(threshold=delta, reuse_interval=3)
        predicted = predict_schedule(uncached, config)["branches"]["cond"]
        handle = apply_bwcache(model, config)
        run_dummy(model, 16)
        actual = handle.trace.to_dict()["branches"]["cond"]
        remove_bwcache(model)
        assert predicted["trigger_step"] == actual["trigger_step"]
        assert predicted["reused"] == actual["reused"]


def test_predict_schedule_refuses_a_cached_trace_and_blockwise_mode():
    model = DoublingTransformer(num_layers=2)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.3, reuse_interval=2))
    run_dummy(model, 10)
    with pytest.raises(ValueError, match="uncached"):
        predict_schedule(handle.trace.to_dict(), BWCacheConfig())
    with pytest.raises(ValueError, match="paper"):
        predict_schedule(handle.trace.to_dict(), BWCacheConfig(mode="blockwise"))


def test_indicator_subset_and_token_stride():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0, indicator_blocks="every_other", indicator_token_stride=3))
    run_dummy(model, 4)
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert [v is None for v in branch["distance"][2]] == [False, True, False, True]
    full = handle.trace.to_dict()
    predicted = predict_schedule(full, BWCacheConfig(threshold=0.2, indicator_blocks=[0, 2]))
    assert predicted["branches"]["cond"]["trigger_step"] == 2
    with pytest.raises(ValueError, match="block"):
        predict_schedule(full, BWCacheConfig(threshold=0.2, indicator_blocks=[1]))


def test_summary_reads_well():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2))
    run_dummy(model, 12)
    text = handle.summary()
    assert "paper mode" in text and "δ=0.1" in text and "DoublingTransformer" in text
    assert "trigger at step 3" in text
    assert "5/12 steps fully reused" in text
    assert "20/48 block evaluations skipped (41.7%)" in text
    # Until the trigger each of the 4 blocks keeps its 4 × 8 float32 input (128 B): 512 B; then one residual.
    assert handle.trace.held_bytes_peak == 512
    assert "cache memory: at most 512 B of residuals and features held between calls" in text


@pytest.mark.parametrize("mode, cache_dtype, expected", [
    ("paper", None, 4 * 128), ("paper", "bfloat16", 4 * 64),
    # Block-wise: every block keeps a residual and a reference input once reuse is possible.
    ("blockwise", None, 4 * 2 * 128), ("blockwise", "bfloat16", 4 * 2 * 64),
])
def test_held_memory_is_counted_exactly(mode, cache_dtype, expected):
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2, mode=mode, cache_dtype=cache_dtype))
    run_dummy(model, 12)
    assert handle.trace.held_bytes_peak == expected
    assert handle.trace.to_dict()["held_bytes_peak"] == expected
