"""The block-wise schedule estimated from an uncached trace: the rule on hand-worked traces, exactness where a reuse
cannot change what decides, and its agreement with real block-wise runs of Tiny Shapes."""

from pathlib import Path

import pytest
import torch

from bwcache import BWCacheConfig, apply_bwcache, cached, estimate_blockwise_schedule, remove_bwcache
from bwcache.config import MODES
from bwcache.resources import TINY_SHAPES_DIR
from bwcache.schedule import predict_schedule, schedule_for
from bwcache.trace import reuse_fraction
from testing_utils.dummy import DoublingTransformer, run_dummy

TINY_READY = (Path(TINY_SHAPES_DIR) / "config.json").is_file()


def synthetic_trace(distances, experts=None, num_blocks=None):
    """An uncached trace of one `cond` branch: `distances[s][i]` for block i at step s."""
    num_blocks = num_blocks or len(distances[1])
    branch = {
        "indicator": [None] + [row[0] for row in distances[1:]],
        "distance": [list(row) for row in distances],
        "reused": [[False] * num_blocks for _ in distances],
        "trigger_step": None,
        "timesteps": [1000.0 - s for s in range(len(distances))],
    }
    if experts is not None:
        branch["experts"] = experts
    return {"config": BWCacheConfig(threshold=0.0).to_dict(), "num_blocks": num_blocks,
            "block_names": [f"blocks.{i}" for i in range(num_blocks)], "branches": {"cond": branch}}


def reused_steps(estimate, block=0):
    return [s for s, row in enumerate(estimate["branches"]["cond"]["reused"]) if row[block]]


# Block 0 changes by 0.05 a step; block 1 by 0.01, but it is no indicator block in the cases below.
EVEN = [[None, None]] + [[0.05, 0.01]] * 9


@pytest.mark.parametrize(
    "delta,reuse,expected",
    [
        (0.12, 3, [2, 3, 5, 6, 8]),  # the sum since the last computed step reaches δ at its third step
        (0.12, 1, [2, 4, 6, 8]),  # R = 1: a computed step after every reuse
        (0.2, 3, [2, 3, 4, 6, 7, 8]),  # the sum stays below δ: R caps the run
        (0.05, 3, []),  # a single step's distance is not below δ
    ],
)
def test_the_rule_on_a_hand_worked_trace(delta, reuse, expected):
    config = BWCacheConfig(threshold=delta, mode="blockwise", reuse_interval=reuse, warmup_steps=2, tail_steps=1,
                           indicator_blocks=[0])
    estimate = estimate_blockwise_schedule(synthetic_trace(EVEN), config)
    assert reused_steps(estimate) == expected
    assert reused_steps(estimate, block=1) == []  # only indicator blocks may reuse
    branch = estimate["branches"]["cond"]
    assert branch["trigger_step"] == (expected[0] if expected else None)
    assert branch["computed"] == [s not in expected for s in range(10)]
    assert branch["reused_steps"] == len(expected)
    assert branch["reuse_fraction"] == estimate["reuse_fraction"] == pytest.approx(len(expected) / 20)


def test_each_expert_counts_its_own_steps():
    # Wan2.2: four steps on the high-noise expert, six on the low-noise one, each with its own warm-up and tail,
    # and no residual at an expert's first step.
    experts = ["transformer"] * 4 + ["transformer_2"] * 6
    trace = synthetic_trace([[None]] + [[0.01]] * 9, experts=experts)
    config = BWCacheConfig(threshold=1.0, mode="blockwise", reuse_interval=2, warmup_steps=1, tail_steps=1)
    assert reused_steps(estimate_blockwise_schedule(trace, config)) == [1, 2, 5, 6, 8]
    del trace["branches"]["cond"]["experts"]
    assert reused_steps(estimate_blockwise_schedule(trace, config)) == [1, 2, 4, 5, 7, 8]


def test_threshold_zero_and_bad_input_are_refused_clearly():
    trace = synthetic_trace(EVEN)
    assert estimate_blockwise_schedule(trace, BWCacheConfig(threshold=0.0, mode="blockwise"))["reuse_fraction"] == 0
    with pytest.raises(ValueError, match="mode='blockwise' only.*predict_schedule"):
        estimate_blockwise_schedule(trace, BWCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="num_inference_steps=12 but the trace has 10"):
        estimate_blockwise_schedule(trace, BWCacheConfig(threshold=0.1, mode="blockwise", num_inference_steps=12))
    holes = synthetic_trace([[None, None]] + [[0.05, None]] * 9)
    with pytest.raises(ValueError, match="no distance for block 1 at step 2"):
        estimate_blockwise_schedule(holes, BWCacheConfig(threshold=0.1, mode="blockwise"))
    cached = synthetic_trace(EVEN)
    cached["branches"]["cond"]["reused"][4][0] = True
    with pytest.raises(ValueError, match="already reuses"):
        estimate_blockwise_schedule(cached, BWCacheConfig(threshold=0.1, mode="blockwise"))
    modulated = synthetic_trace(EVEN)
    modulated["config"]["indicator_feature"] = "modulated"
    with pytest.raises(ValueError, match="indicator_feature='modulated'"):
        estimate_blockwise_schedule(modulated, BWCacheConfig(threshold=0.1, mode="blockwise"))


@pytest.mark.parametrize("delta", [0.1, 0.2, 0.3, 0.7])
def test_exact_when_a_reuse_changes_nothing_that_decides(delta):
    # Only the last block may reuse, so every block's input is the uncached one at every step (the dummy's inputs do
    # not depend on its outputs), and with accumulated distances the run decides on exactly the recorded sums.
    model = DoublingTransformer(num_layers=3)
    handle = apply_bwcache(model, BWCacheConfig(threshold=0.0, mode="blockwise"))
    run_dummy(model, 14, values=lambda s: 1.0 + 0.02 * s * s)
    uncached = handle.trace.to_dict()
    remove_bwcache(model)
    config = BWCacheConfig(threshold=delta, mode="blockwise", reuse_interval=3, warmup_steps=2, tail_steps=1,
                           indicator_blocks=[2], accumulate_distance=True)
    estimate = estimate_blockwise_schedule(uncached, config)["branches"]["cond"]
    handle = apply_bwcache(model, config)
    run_dummy(model, 14, values=lambda s: 1.0 + 0.02 * s * s)
    actual = handle.trace.to_dict()["branches"]["cond"]
    remove_bwcache(model)
    assert estimate["reused"] == actual["reused"]
    assert estimate["trigger_step"] == actual["trigger_step"]


def dummy_run(config, steps=12):
    model = DoublingTransformer(num_layers=3)
    handle = apply_bwcache(model, config)
    run_dummy(model, steps, values=lambda s: 1.0 + 0.02 * s * s)
    return handle.trace.to_dict()


def test_schedule_for_follows_the_mode():
    uncached = dummy_run(BWCacheConfig(threshold=0.0))
    paper = BWCacheConfig(threshold=0.1, reuse_interval=2)
    assert schedule_for(uncached, paper) == predict_schedule(uncached, paper)
    blockwise = BWCacheConfig(threshold=0.1, mode="blockwise", reuse_interval=2)
    assert schedule_for(uncached, blockwise) == estimate_blockwise_schedule(uncached, blockwise)


@pytest.mark.skipif("static" not in MODES, reason="this bwcache has no static mode")
@pytest.mark.parametrize("delta", [0.0, 0.2])
def test_static_mode_is_predicted_exactly(delta):
    # No distance decides in static mode: the uncached trace gives its schedule exactly, whatever reuse changes.
    uncached = dummy_run(BWCacheConfig(threshold=0.0))
    config = BWCacheConfig(threshold=delta, mode="static", reuse_interval=2, warmup_steps=2, tail_steps=1)
    actual = dummy_run(config)["branches"]["cond"]
    predicted = schedule_for(uncached, config)["branches"]["cond"]
    assert predicted["reused"] == actual["reused"] and predicted["trigger_step"] == actual["trigger_step"]
    assert any(map(any, actual["reused"])) == (delta > 0)


# ----------------------------------------------------------------------------- Tiny Shapes, real runs

# The default preset's cache settings at the smallest clip it allows.
PRESET = dict(mode="blockwise", reuse_interval=2, warmup_steps=6, tail_steps=2, indicator_token_stride=4)
CALL = dict(prompt="a red square moving right", num_frames=8, height=32, width=32, num_inference_steps=30,
            guidance_scale=5.0, output_type="np")
# Measured on Tiny Shapes (4 prompts and seeds, 8 and 16 frames, R 2 with 6 warm-up and 2 tail steps, and R 3 with
# 2 and 1): for δ from 0.06 to 0.2 the estimated reuse fraction was within 0.039 of the run's. Just above the
# smallest distances (δ = 0.03) the estimate falls short by up to 0.10: a reused block hands the next block an input
# closer to its cached one, so the blocks after it reuse too, which per-block distances cannot foresee.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def tiny():
    if not TINY_READY:
        pytest.skip("the Tiny Shapes weights (assets/tiny-shapes/) are not there")
    from bwcache.tiny import load_pipeline

    pipe = load_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)

    def run(config):
        with cached(pipe, config) as handle:
            pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0))
        return handle.trace.to_dict()

    # The uncached distance map, recorded as the runner records it.
    return run, run(BWCacheConfig(threshold=0.0))


@pytest.mark.parametrize("delta", [0.06, 0.1, 0.2])
def test_estimate_agrees_with_real_blockwise_runs(tiny, delta):
    run, uncached = tiny
    config = BWCacheConfig(threshold=delta, **PRESET)
    estimate = estimate_blockwise_schedule(uncached, config)
    actual = run(config)
    assert 0 < reuse_fraction(actual) < 0.5  # between no reuse and the static pattern: the estimate has work to do
    assert estimate["reuse_fraction"] == pytest.approx(reuse_fraction(actual), abs=TOLERANCE)
    # Up to its first reuse the run is the uncached run: that step is exact.
    for name, branch in actual["branches"].items():
        assert estimate["branches"][name]["trigger_step"] == branch["trigger_step"]


def test_estimate_is_exact_at_both_ends(tiny):
    run, uncached = tiny
    window = [row[i] for branch in uncached["branches"].values() for row in branch["distance"][6:28]
              for i in range(uncached["num_blocks"])]
    # Below every distance that could decide, nothing is reused, so the run stays the uncached run.
    low = BWCacheConfig(threshold=0.9 * min(window), **PRESET)
    actual = run(low)
    assert reuse_fraction(actual) == 0
    assert estimate_blockwise_schedule(uncached, low)["reuse_fraction"] == 0
    # Above every distance either decides on, every block reuses R steps of each R + 1 in the window.
    high = BWCacheConfig(threshold=1.0, **PRESET)
    actual = run(high)
    decided = [v for branch in actual["branches"].values() for row in branch["distance"] for v in row
               if v is not None]
    assert decided and max(decided) < high.threshold
    estimate = estimate_blockwise_schedule(uncached, high)
    for name, branch in actual["branches"].items():
        assert estimate["branches"][name]["reused"] == branch["reused"]
        assert [any(row) for row in branch["reused"]] == [6 <= s < 28 and (s - 6) % 3 != 2 for s in range(30)]
