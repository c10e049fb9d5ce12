"""BWCache on tiny random builds of every supported video transformer family."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bwcache import BWCacheConfig, apply_bwcache, predict_schedule, remove_bwcache
from bwcache.blocks import find_blocks
from testing_utils.families import FAMILIES, run_steps

STEPS = 8
NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def models():
    return {name: FAMILIES[name].build() for name in NAMES}


def uncached(model, family):
    return run_steps(model, family, STEPS)


@pytest.mark.parametrize("name", NAMES)
def test_threshold_zero_and_removal_are_bit_identical(models, name):
    model, family = models[name], FAMILIES[name]
    reference = uncached(model, family)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0))
    cached = run_steps(model, family, STEPS)
    model._reset_stateful_cache()
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    trace = handle.trace.to_dict()
    branch = trace["branches"]["cond"]
    assert len(branch["indicator"]) == STEPS
    assert all(v is not None for row in branch["distance"][1:] for v in row)
    assert trace["num_blocks"] == len(find_blocks(model))
    remove_bwcache(model)
    after = uncached(model, family)
    assert all(torch.equal(a, b) for a, b in zip(reference, after))


@pytest.mark.parametrize("name", NAMES)
def test_reused_steps_add_the_residual_of_the_last_computed_step(models, name):
    """Per chain of blocks: output − input at a reused step equals output − input at the last computed step."""
    model, family = models[name], FAMILIES[name]
    blocks = find_blocks(model)
    seen = {}

    def capture(spec):
        def pre(module, args, kwargs):
            hs = spec.metadata._get_parameter_from_args_kwargs(spec.metadata.hidden_states_argument_name, args, kwargs)
            seen.setdefault(step[0], {})[spec.index] = [hs, None]

        def post(module, args, kwargs, output):
            out = output[spec.metadata.return_hidden_states_index] if isinstance(output, tuple) else output
            seen[step[0]][spec.index][1] = out

        return pre, post

    step = [0]
    handles = []
    for spec in blocks:
        pre, post = capture(spec)
        handles.append(spec.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(spec.module.register_forward_hook(post, with_kwargs=True))
    cache = apply_bwcache(model, BWCacheConfig(threshold=1e9, reuse_interval=2))
    base = family.inputs(0)
    try:
        with torch.no_grad():
            for s in range(STEPS):
                step[0] = s
                with model.cache_context("cond", step_index=s, num_inference_steps=STEPS):
                    out = model(**family.step_inputs(base, s), return_dict=False)[0]
                assert torch.isfinite(out).all()
            state = cache._hook.state_manager._state_cache["cond"]
            heads = [i for i, head in enumerate(state.chain_heads) if head]
    finally:
        for h in handles:
            h.remove()
        model._reset_stateful_cache()
        remove_bwcache(model)
    branch = cache.trace.to_dict()["branches"]["cond"]
    assert branch["trigger_step"] == 1
    reused_steps = [s for s, row in enumerate(branch["reused"]) if all(row)]
    assert reused_steps == [2, 3, 5, 6]
    chains = [(h, (heads + [len(blocks)])[k + 1] - 1) for k, h in enumerate(heads)]
    if name == "latte":
        assert len(chains) == len(blocks)  # reshapes between spatial and temporal blocks break every chain
    else:
        assert chains == [(0, len(blocks) - 1)]  # the whole stack is one chain
    for s in reused_steps:
        computed = max(c for c in range(s) if c not in reused_steps)
        for head, tail in chains:
            now = seen[s][tail][1] - seen[s][head][0]
            then = seen[computed][tail][1] - seen[computed][head][0]
            torch.testing.assert_close(now, then, rtol=1e-4, atol=1e-5)
            for member in range(head + 1, tail + 1):
                assert seen[s][member][1] is seen[s][member][0]  # passed through untouched


@pytest.mark.parametrize("name", NAMES)
def test_predicted_schedules_match_cached_runs(models, name):
    model, family = models[name], FAMILIES[name]
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0))
    run_steps(model, family, STEPS)
    model._reset_stateful_cache()
    remove_bwcache(model)
    uncached_trace = handle.trace.to_dict()
    indicator = [v for v in uncached_trace["branches"]["cond"]["indicator"] if v is not None]
    # Thresholds just above each recorded value trigger at every possible step.
    for delta in sorted({v * 1.0001 for v in indicator}):
        config = BWCacheConfig(threshold=delta, reuse_interval=2)
        predicted = predict_schedule(uncached_trace, config)["branches"]["cond"]
        cache = apply_bwcache(model, config)
        run_steps(model, family, STEPS)
        model._reset_stateful_cache()
        remove_bwcache(model)
        actual = cache.trace.to_dict()["branches"]["cond"]
        assert predicted["trigger_step"] == actual["trigger_step"]
        assert predicted["reused"] == actual["reused"]


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "latte"])
def test_reuse_lowers_counted_flops(models, name):
    model, family = models[name], FAMILIES[name]

    def count():
        with FlopCounterMode(display=False) as counter:
            run_steps(model, family, STEPS)
        model._reset_stateful_cache()
        return counter.get_total_flops()

    plain = count()
    handle = apply_bwcache(model, BWCacheConfig(threshold=1e9, reuse_interval=2))
    cached = count()
    remove_bwcache(model)
    reused = handle.trace.reuse_fraction
    assert reused == pytest.approx(4 / STEPS)
    assert cached < plain * (1 - 0.5 * reused)
