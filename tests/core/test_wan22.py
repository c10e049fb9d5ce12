"""Wan2.2: both experts of the A14B pipeline cached, each with its own state and schedule; the TI2V-5B pipeline."""

import re

import pytest
import torch

import bwcache
from bwcache import BWCacheConfig
from bwcache.instruments import block_timer
from testing_utils.tiny_wan import build_wan22_pipeline, build_wan22_ti2v_pipeline

STEPS = 10
# The tiny scheduler's 10 timesteps put steps 0–3 above the boundary (875): `transformer` takes them.
HIGH = 4
REUSE = BWCacheConfig(threshold=1e9, reuse_interval=1)


def generate(pipe, steps=STEPS, size=16, channels=32, **kwargs):
    embeds = torch.randn(1, 8, channels, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, 8, channels, generator=torch.Generator().manual_seed(2))
    return pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size, num_frames=5,
        num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(0),
        output_type="np", **kwargs,
    ).frames


@pytest.fixture(scope="module")
def pipe():
    return build_wan22_pipeline()


def test_both_experts_are_cached_each_on_its_own_schedule(pipe):
    calls = {"transformer": [], "transformer_2": []}
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(lambda m, a, k, name=name: calls[name].append(k["timestep"]), with_kwargs=True)
        for name in calls
    ]
    try:
        uncached = generate(pipe)
        n_high = len(calls["transformer"]) // 2
        with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)):
            assert (generate(pipe) == uncached).all()
        held = {}

        def look(pipe, i, t, kwargs):
            held.update({hook.expert: bool(hook.states) for hook in handle.hooks} if i == STEPS - 1 else {})
            return kwargs

        with bwcache.cached(pipe, REUSE) as handle:
            cached = generate(pipe, callback_on_step_end=look)
    finally:
        for h in hooks:
            h.remove()
    assert n_high == HIGH
    assert set(handle.transformers) == {"transformer", "transformer_2"}
    trace = handle.trace.to_dict()
    assert sorted(trace["branches"]) == ["cond", "uncond"]
    for branch in trace["branches"].values():
        assert branch["experts"] == ["transformer"] * HIGH + ["transformer_2"] * (STEPS - HIGH)
        # Each expert starts its own schedule: computed, trigger at its second step, R = 1, one tail step.
        assert ["r" if all(row) else "C" for row in branch["reused"]] == list("CCrC" + "CCrCrC")
        assert branch["triggers"] == {"transformer": 1, "transformer_2": HIGH + 1}
        assert branch["trigger_step"] == 1
    summary = handle.summary()
    assert re.search(r"transformer/cond \(steps 0–3\)\s+trigger at step 1; 1/4 steps fully reused", summary)
    assert re.search(r"transformer_2/uncond \(steps 4–9\)\s+trigger at step 5; 2/6 steps fully reused", summary)
    # The high-noise expert's cache is freed once the low-noise expert takes over.
    assert held == {"transformer": False, "transformer_2": True}
    assert not (cached == uncached).all()
    assert abs(cached - uncached).mean() < 0.05


def test_a_reused_low_noise_step_adds_the_low_noise_experts_own_residual(pipe):
    """The whole stack is one chain: at a reused step, last block's output − first block's input is the residual of
    the same expert's last computed step in the same branch, never the other expert's."""
    calls = []  # per transformer call: [expert, first block's input, last block's output]

    def first(name):
        return lambda module, args, kwargs: calls.append([name, args[0], None])

    def last(module, args, kwargs, output):
        calls[-1][2] = output

    handles = []
    for name in ("transformer", "transformer_2"):
        blocks = getattr(pipe, name).blocks
        handles.append(blocks[0].register_forward_pre_hook(first(name), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(last, with_kwargs=True))
    try:
        with bwcache.cached(pipe, REUSE):
            generate(pipe)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2 * STEPS
    residual = {step: calls[2 * step][2] - calls[2 * step][1] for step in range(STEPS)}  # cond branch
    assert [calls[2 * step][0] for step in (HIGH - 1, HIGH, HIGH + 2)] == ["transformer", "transformer_2", "transformer_2"]
    # Step HIGH + 2 is reused by transformer_2; its last computed step is HIGH + 1; transformer's was HIGH - 1.
    torch.testing.assert_close(residual[HIGH + 2], residual[HIGH + 1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(residual[HIGH + 2], residual[HIGH - 1], rtol=1e-2, atol=1e-3)
    # Step 2 is reused by transformer from its own step 1.
    torch.testing.assert_close(residual[2], residual[1], rtol=1e-4, atol=1e-5)


def test_ti2v_5b_pipeline_is_cached_with_per_token_timesteps():
    pipe = build_wan22_ti2v_pipeline()

    def run():
        embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
        negative = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_frames=5,
            num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np",
        ).frames

    uncached = run()
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)):
        assert (run() == uncached).all()
    with bwcache.cached(pipe, REUSE) as handle:
        cached = run()
    for branch in handle.trace.to_dict()["branches"].values():
        assert ["r" if all(row) else "C" for row in branch["reused"]] == list("CCrCrC")
        assert "experts" not in branch
    assert not (cached == uncached).all()


def test_the_block_timer_of_a_pipeline_times_both_experts(pipe):
    timer = block_timer(pipe, "cpu")
    try:
        generate(pipe)
    finally:
        timer.remove()
    assert timer.calls == 2 * STEPS * len(pipe.transformer.blocks)  # cond and uncond, whichever expert runs
