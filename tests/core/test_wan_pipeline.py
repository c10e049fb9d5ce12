"""BWCache through the stock diffusers WanPipeline, with tiny random components and precomputed prompt embeddings."""

import pytest
import torch

from bwcache import BWCacheConfig, apply_bwcache, remove_bwcache
from bwcache.blocks import find_blocks
from testing_utils.tiny_wan import build_wan_pipeline

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return build_wan_pipeline()


def generate(pipe, seed=0):
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    return pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
        num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="np",
    ).frames


def test_threshold_zero_is_bit_identical_and_the_trace_outlives_the_call(pipe):
    reference = generate(pipe)
    handle = apply_bwcache(pipe.transformer, BWCacheConfig(threshold=0.0))
    try:
        cached = generate(pipe)
    finally:
        remove_bwcache(pipe.transformer)
    assert (reference == cached).all()
    trace = handle.trace.to_dict()
    assert sorted(trace["branches"]) == ["cond", "uncond"]
    for branch in trace["branches"].values():
        assert len(branch["indicator"]) == STEPS
        assert branch["indicator"][0] is None and all(v > 0 for v in branch["indicator"][1:])
    assert (generate(pipe) == reference).all()


def test_recorded_distances_are_the_relative_l1_of_the_block_inputs(pipe):
    blocks = find_blocks(pipe.transformer)
    inputs = []  # per call of the transformer: the hidden-states input of each block
    hooks = [
        spec.module.register_forward_pre_hook(
            lambda module, args, kwargs, i=spec.index: inputs.append((i, args[0].clone())), with_kwargs=True
        )
        for spec in blocks
    ]
    handle = apply_bwcache(pipe.transformer, BWCacheConfig(threshold=0.0))
    try:
        generate(pipe)
    finally:
        remove_bwcache(pipe.transformer)
        for h in hooks:
            h.remove()
    n = len(blocks)
    calls = [inputs[k : k + n] for k in range(0, len(inputs), n)]
    assert len(calls) == 2 * STEPS  # cond then uncond at every step
    trace = handle.trace.to_dict()["branches"]
    for branch, offset in (("cond", 0), ("uncond", 1)):
        for step in range(1, STEPS):
            now, before = calls[2 * step + offset], calls[2 * (step - 1) + offset]
            for (i, h), (_, h_prev) in zip(now, before):
                expected = ((h - h_prev).abs().mean() / h_prev.abs().mean()).item()
                assert trace[branch]["distance"][step][i] == pytest.approx(expected, rel=1e-5)


def test_reuse_through_the_pipeline_and_two_generations_in_a_row(pipe):
    reference = generate(pipe)
    handle = apply_bwcache(pipe.transformer, BWCacheConfig(threshold=10.0, reuse_interval=1))
    try:
        first = generate(pipe)
        first_trace = handle.trace.to_dict()
        second = generate(pipe)
    finally:
        remove_bwcache(pipe.transformer)
    assert (first == second).all()
    assert handle.trace.to_dict() == first_trace
    for branch in first_trace["branches"].values():
        assert branch["trigger_step"] == 1
        assert ["r" if all(row) else "C" for row in branch["reused"]] == list("CCrCrC")
    assert not (first == reference).all()
    assert abs(first - reference).mean() < 0.05
