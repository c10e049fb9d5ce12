"""BWCache applied to the stock pipeline of every family: no step count to name, and no leak from aborted calls."""

import pytest
import torch

import bwcache
from bwcache import BWCacheConfig, apply_bwcache
from testing_utils.tiny_pipelines import PIPELINES, generate

NAMES = sorted(PIPELINES)
# Reuse every other step from step 2 on: every family reuses, so a leaked residual would show.
REUSE = BWCacheConfig(threshold=1e9, reuse_interval=1)


class Abort(Exception):
    pass


def abort_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Abort
        return kwargs

    return callback


@pytest.fixture(scope="module")
def pipes():
    return {name: PIPELINES[name]() for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_the_step_count_comes_from_the_pipeline_and_follows_each_call(pipes, name):
    pipe = pipes[name]
    uncached = generate(name, pipe, num_inference_steps=4)
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)):
        assert torch.equal(generate(name, pipe, num_inference_steps=4), uncached)
    with bwcache.cached(pipe, REUSE) as handle:
        for steps, pattern in ((6, "CCrCrC"), (4, "CCrC")):
            output = generate(name, pipe, num_inference_steps=steps)
            assert torch.isfinite(output).all()
            branches = handle.trace.to_dict()["branches"]
            assert branches, name
            for branch in branches.values():
                assert ["r" if all(row) else "C" for row in branch["reused"]] == list(pattern)
                assert branch["trigger_step"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_the_call_after_an_aborted_one_is_a_fresh_generation(pipes, name):
    pipe = pipes[name]
    with bwcache.cached(pipe, REUSE) as handle:
        fresh = generate(name, pipe, num_inference_steps=6, seed=1)
        fresh_trace = handle.trace.to_dict()
    with bwcache.cached(pipe, REUSE) as handle:
        # Stopped at step 3 of 6 (a reused step follows), then stopped at step 0.
        for step in (3, 0):
            with pytest.raises(Abort):
                generate(name, pipe, num_inference_steps=6, seed=0, callback_on_step_end=abort_at(step))
        after = generate(name, pipe, num_inference_steps=6, seed=1)
        assert handle.trace.to_dict() == fresh_trace
    assert torch.equal(after, fresh)


def test_a_transformer_alone_without_a_step_count_is_a_clear_error(pipes):
    pipe = pipes["cogvideox"]
    with bwcache.cached(pipe.transformer, BWCacheConfig(threshold=0.1)):
        with pytest.raises(ValueError, match=r"number of denoising steps: apply it to the pipeline \(apply_bwcache\(pipe"):
            generate("cogvideox", pipe)
    handle = apply_bwcache(pipe, BWCacheConfig(threshold=0.1))
    generate("cogvideox", pipe)
    handle.remove()
