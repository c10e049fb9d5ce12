"""The timers behind the ideal speedup and the cache's own cost sit inside or outside BWCache's hooks by order."""

import time
import types

import torch

from bwcache import BWCacheConfig, apply_bwcache, register_block, remove_bwcache
from bwcache.instruments import ForwardTimer, block_timer
from testing_utils.dummy import DoublingBlock, DoublingTransformer, run_dummy

BLOCK_SECONDS = 0.01


class SlowDoublingBlock(DoublingBlock):
    def forward(self, hidden_states, temb=None):
        time.sleep(BLOCK_SECONDS)
        return super().forward(hidden_states, temb)


register_block(SlowDoublingBlock)


def slow_model(num_layers=3):
    model = DoublingTransformer(num_layers=num_layers)
    model.blocks = torch.nn.ModuleList([SlowDoublingBlock() for _ in range(num_layers)])
    return model


def test_a_timer_registered_first_sees_only_the_blocks_that_run():
    model = slow_model()
    plain = run_dummy(model, 6)
    inner = block_timer(model, "cpu")
    # Paper mode forced to trigger at step 1 with R=1: steps 2 and 4 are reused, so 4 of 6 steps run the blocks.
    handle = apply_bwcache(model, BWCacheConfig(threshold=10.0, reuse_interval=1))
    outer = ForwardTimer([spec.module for spec in handle._hook.blocks], "cpu")
    run_dummy(model, 6)
    assert [all(row) for row in handle.trace.to_dict()["branches"]["cond"]["reused"]] == [False, False, True, False, True, False]
    assert (inner.calls, outer.calls) == (4 * 3, 6 * 3)
    assert inner.seconds >= 4 * 3 * BLOCK_SECONDS and outer.seconds >= inner.seconds
    # Removed from the outermost in: the model runs as before.
    outer.remove()
    remove_bwcache(model)
    inner.remove()
    assert all(not block._diffusers_hook.hooks for block in model.blocks)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, run_dummy(model, 6)))


def test_a_timer_around_nested_calls_times_each_call_from_its_own_start(monkeypatch):
    """A transformer and its blocks nest: each call is timed from its own start (a clock ticking once a reading)."""
    ticks = iter(range(1000))
    monkeypatch.setattr("bwcache.instruments.time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    model = DoublingTransformer(num_layers=2)
    timer = ForwardTimer([model] + list(model.blocks), "cpu", around_call=True)
    try:
        model(torch.ones(1, 4, 8))
    finally:
        timer.remove()
    # Readings: model 0, block 1–2, block 3–4, model 5: the blocks take 1 each, the model 5.
    assert (timer.calls, timer.seconds) == (3, 7)
