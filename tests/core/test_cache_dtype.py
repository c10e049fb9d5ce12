"""`cache_dtype`: cached residuals and indicator features stored narrower than the model's dtype."""

import dataclasses

import numpy as np
import pytest
import torch

from bwcache import BWCacheConfig, apply_bwcache, remove_bwcache
from bwcache.instruments import peak_tensor_bytes
from bwcache.metrics import compare_videos
from bwcache.runner import generate, resolve_config, resolve_preset, resolve_settings
from testing_utils.dummy import DoublingTransformer, step_dummy


def _stored_tensors(handle):
    for state in handle._hook.state_manager._state_cache.values():
        for residuals in state.residuals.values():
            yield from (t for t in residuals if t is not None)
        yield from (t for t in state.features if t is not None)


@pytest.mark.parametrize("mode", ["paper", "blockwise"])
def test_bfloat16_storage_keeps_exact_numbers_where_bfloat16_holds_them(mode):
    # Every number stored here (the dummy's inputs 2 − 2^-s for s < 8 and their doublings; paper mode's residual
    # 7 · 1.875 from its trigger at step 3) fits bfloat16's 8 significant bits, so bfloat16 storage changes no
    # number: the outputs are the float32-storage outputs exactly, and stay float32.
    def run(cache_dtype):
        model = DoublingTransformer(num_layers=3)
        config = BWCacheConfig(threshold=0.1, reuse_interval=2, mode=mode, warmup_steps=1, tail_steps=0,
                               cache_dtype=cache_dtype)
        handle = apply_bwcache(model, config)
        outputs, stored = [], set()
        for step in range(8):
            outputs.append(step_dummy(model, step, 8))
            stored |= {t.dtype for t in _stored_tensors(handle)}
        reused = sum(any(row) for row in handle.trace.branch("cond").reused)
        return outputs, stored, reused

    wide, wide_dtypes, wide_reused = run(None)
    narrow, narrow_dtypes, narrow_reused = run("bfloat16")
    assert wide_dtypes == {torch.float32} and narrow_dtypes == {torch.bfloat16}
    assert narrow_reused == wide_reused > 0
    for a, b in zip(wide, narrow):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_a_storage_dtype_no_narrower_than_the_model_is_not_applied():
    model = DoublingTransformer(num_layers=2).to(torch.bfloat16)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.1, reuse_interval=2, cache_dtype=torch.float16))
    assert handle.config.cache_dtype == "float16"
    for step in range(5):
        assert step_dummy(model, step, 12, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert handle._hook.state_manager._state_cache["cond"].trigger_step == 3
    assert {t.dtype for t in _stored_tensors(handle)} == {torch.bfloat16}


@pytest.fixture(scope="module")
def tiny():
    from bwcache.pipelines import get_pipeline

    preset = resolve_preset("tiny-shapes")
    pipe = get_pipeline(preset, "cpu")
    pipe.set_progress_bar_config(disable=True)
    settings = resolve_settings(preset, prompt="a blue circle moving up", seed=1, num_inference_steps=16)
    return pipe, preset, settings


def test_bfloat16_storage_halves_the_extra_memory_at_no_visible_cost_on_the_embedded_model(tiny):
    pipe, preset, settings = tiny
    config = resolve_config(preset, 16, cache_dtype="bfloat16")

    def run(cache_config):
        holder = {}
        if cache_config is not None:
            apply_bwcache(pipe.transformer, cache_config)
        try:
            peak = peak_tensor_bytes(lambda: holder.update(frames=generate(pipe, preset, settings, "cpu")[0]))
        finally:
            if cache_config is not None:
                remove_bwcache(pipe.transformer)
        return holder["frames"], peak

    base, base_peak = run(None)
    wide, wide_peak = run(dataclasses.replace(config, cache_dtype=None))
    narrow, narrow_peak = run(config)
    zero, _ = run(dataclasses.replace(config, threshold=0.0))
    assert np.array_equal(zero, base)
    assert not np.array_equal(narrow, base)
    # One residual per block, half the bytes: the extra peak halves (within the strided features' share).
    assert 0 < narrow_peak - base_peak < 0.55 * (wide_peak - base_peak)
    quality = compare_videos(wide, narrow)
    assert quality["psnr"] > 50, quality
    assert abs(compare_videos(base, narrow)["psnr"] - compare_videos(base, wide)["psnr"]) < 0.1
