"""Block-wise mode on the doubling dummy, against an independent scalar simulation of the documented rule."""

import pytest
import torch

import bwcache
from bwcache import BWCacheConfig, apply_bwcache
from testing_utils.dummy import DoublingTransformer, dyadic, run_dummy, step_dummy


def reference_blockwise(values, steps, blocks, delta, reuse, warmup, tail, indicator=None, accumulate=False):
    indicator = set(range(blocks)) if indicator is None else set(indicator)
    ref, prev, res, run, acc = [None] * blocks, [None] * blocks, [None] * blocks, [0] * blocks, [0.0] * blocks
    outputs, reused, measured = [], [], []
    for s in range(steps):
        v, row, seen = values(s), [], []
        for i in range(blocks):
            base = prev[i] if accumulate else ref[i]
            ok = i in indicator and base is not None and res[i] is not None and warmup <= s < steps - tail and run[i] < reuse
            # The distance is measured only where it can decide.
            d = abs(v - base) / abs(base) + (acc[i] if accumulate else 0.0) if ok else None
            if ok and d < delta:
                run[i] += 1
                if accumulate:
                    acc[i], prev[i] = d, v
                v = v + res[i]
                row.append(True)
                seen.append(True)  # the distance a reuse was decided on is in the distance map too
                continue
            seen.append(ok)
            if i in indicator and warmup <= s + 1 < steps - tail:
                res[i] = 2 * v - v
                ref[i] = prev[i] = v
            else:
                res[i] = ref[i] = prev[i] = None
            run[i], acc[i] = 0, 0.0
            v = 2 * v
            row.append(False)
        outputs.append(v)
        reused.append(row)
        measured.append(seen)
    return outputs, reused, measured


def slow(step):
    return 1.0 + 0.01 * step * step  # changes that grow: late steps stop being reusable


@pytest.mark.parametrize(
    "values,delta,reuse,warmup,tail,indicator,accumulate",
    [
        (dyadic, 0.1, 2, 2, 1, None, False),
        (dyadic, 0.05, 3, 1, 2, None, False),
        (slow, 0.08, 3, 2, 1, None, False),
        (slow, 0.08, 5, 2, 1, [1, 2], False),
        (dyadic, 0.1, 3, 2, 1, None, True),
        (slow, 0.15, 4, 1, 1, None, True),
    ],
)
def test_blockwise_matches_the_documented_rule(values, delta, reuse, warmup, tail, indicator, accumulate):
    steps, blocks = 12, 4
    model = DoublingTransformer(num_layers=blocks)
    config = BWCacheConfig(
        threshold=delta,
        reuse_interval=reuse,
        mode="blockwise",
        warmup_steps=warmup,
        tail_steps=tail,
        indicator_blocks=indicator,
        accumulate_distance=accumulate,
    )
    handle = apply_bwcache(model, config)
    outputs = run_dummy(model, steps, values=values)
    expected, reused, measured = reference_blockwise(
        values, steps, blocks, delta, reuse, warmup, tail, indicator, accumulate
    )
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert branch["reused"] == reused
    assert [[d is not None for d in row] for row in branch["distance"]] == measured
    assert any(any(row) for row in reused), "the case should exercise reuse"
    for out, value in zip(outputs, expected):
        assert out[0].unique().tolist() == [pytest.approx(value, rel=1e-6)]
    first = next(s for s, row in enumerate(reused) if any(row))
    assert branch["trigger_step"] == first


def test_blockwise_threshold_zero_is_bit_identical_and_records_every_distance():
    model = DoublingTransformer(num_layers=3)
    plain = run_dummy(model, 6)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0, mode="blockwise"))
    cached = run_dummy(model, 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, cached))
    branch = handle.trace.to_dict()["branches"]["cond"]
    assert all(v is not None for row in branch["distance"][1:] for v in row)
    assert branch["trigger_step"] is None


def test_blockwise_keeps_no_residual_for_blocks_that_never_reuse():
    model = DoublingTransformer(num_layers=4)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, mode="blockwise", indicator_blocks=[1, 2]))
    for step in range(4):
        step_dummy(model, step, 10)
    state = handle._hook.state_manager._state_cache["cond"]
    assert sorted(state.residuals) == [1, 2]


def test_a_non_finite_distance_never_licenses_a_reuse():
    """One NaN in the input at step 3, where every block would reuse: their distances are NaN, so they compute;
    at step 4 the distance to that NaN reference is NaN too, so they compute again; then reuse resumes. The trace
    marks the distances and stays valid JSON."""
    import json
    import math

    def values(step):
        return float("nan") if step == 3 else dyadic(step)

    model = DoublingTransformer(num_layers=3)
    config = BWCacheConfig(threshold=0.5, mode="blockwise", reuse_interval=3, warmup_steps=1, tail_steps=1)
    with bwcache.cached(model, config) as handle:
        run_dummy(model, 10)
        assert all(handle.trace.to_dict()["branches"]["cond"]["reused"][3])
    with bwcache.cached(model, config) as handle:
        run_dummy(model, 10, values=values)
        trace = handle.trace.to_dict()
    branch = trace["branches"]["cond"]
    assert not any(branch["reused"][3]) and not any(branch["reused"][4]) and any(branch["reused"][5])
    assert {step for step, _ in branch["nonfinite"]} == {3, 4} and [3, 0] in branch["nonfinite"]
    assert all(v is None or math.isfinite(v) for row in branch["distance"] for v in row)
    json.dumps(trace, allow_nan=False)
    assert "non-finite distance" in handle.summary()


def test_a_non_finite_indicator_does_not_trigger_paper_mode():
    """The dyadic inputs' indicator falls below 0.1 first at step 3 (0.071); an infinite input there makes the
    indicators of steps 3 and 4 non-finite, so the trigger waits for step 5."""
    import json

    def values(step):
        return float("inf") if step == 3 else dyadic(step)

    model = DoublingTransformer(num_layers=2)
    config = BWCacheConfig(threshold=0.1, reuse_interval=1)
    with bwcache.cached(model, config) as handle:
        run_dummy(model, 12)
        assert handle.trace.to_dict()["branches"]["cond"]["trigger_step"] == 3
    with bwcache.cached(model, config) as handle:
        run_dummy(model, 12, values=values)
        trace = handle.trace.to_dict()
    branch = trace["branches"]["cond"]
    assert branch["trigger_step"] == 5
    assert {step for step, _ in branch["nonfinite"]} == {3, 4} and [3, None] in branch["nonfinite"]
    json.dumps(trace, allow_nan=False)
