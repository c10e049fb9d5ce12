"""BWCache where diffusers runs: offloading, stacked caches, the context-manager form, wrong step counts."""

import pytest
import torch
from accelerate import cpu_offload
from diffusers import FirstBlockCacheConfig
from diffusers.hooks import apply_first_block_cache

import bwcache
from bwcache import BWCacheConfig, apply_bwcache, remove_bwcache
from testing_utils.dummy import DoublingTransformer, run_dummy, step_dummy
from testing_utils.families import FAMILIES, run_steps
from testing_utils.tiny_wan import build_wan_pipeline

STEPS = 6
REUSE = BWCacheConfig(threshold=10.0, reuse_interval=1)


def generate(pipe, steps=STEPS, seed=0):
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    return pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames


@pytest.fixture(scope="module")
def eager():
    """The uncached video, and the cached video with its trace, on a pipeline without offloading."""
    pipe = build_wan_pipeline()
    uncached = generate(pipe)
    with bwcache.cached(pipe, REUSE) as handle:
        cached = generate(pipe)
    return uncached, cached, handle.trace.to_dict()


def _offload(pipe, kind):
    cpu = torch.device("cpu")
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "sequential":
        # What pipe.enable_sequential_cpu_offload() does on an accelerator: every module's weights stay on the meta
        # device and are brought in for each call. (On a CPU it asks accelerate for "cpu:0", which accelerate's
        # set_module_tensor_to_device does not handle on this torch, with or without BWCache.)
        for component in (pipe.transformer, pipe.vae):
            cpu_offload(component, cpu, offload_buffers=len(component._parameters) > 0)
    elif kind == "group-block":
        pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    else:
        pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")


@pytest.mark.parametrize("order", ["offload-first", "cache-first"])
@pytest.mark.parametrize("kind", ["model", "sequential", "group-block", "group-leaf"])
def test_offloading_in_either_order_caches_every_generation(eager, kind, order):
    uncached, cached, trace = eager
    pipe = build_wan_pipeline()
    if order == "offload-first":
        _offload(pipe, kind)
    handle = apply_bwcache(pipe, REUSE)
    if order == "cache-first":
        _offload(pipe, kind)
    first = generate(pipe)
    first_trace = handle.trace.to_dict()
    second = generate(pipe)
    assert handle.trace.to_dict() == first_trace == trace
    assert handle.trace.reuse_fraction == pytest.approx(1 / 3)
    assert (first == cached).all() and (second == cached).all()
    handle.remove()
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)):
        assert (generate(pipe) == uncached).all()


def test_stacking_is_refused_both_ways():
    model = FAMILIES["wan"].build()
    handle = apply_bwcache(model)
    with pytest.raises(ValueError, match="BWCache is applied to this WanTransformer3DModel, so FirstBlockCacheConfig"):
        model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert not model.is_cache_enabled
    # A diffusers cache applied by a function that bypasses enable_cache is refused at the next generation.
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="Another cache was applied on top of BWCache .*fbc_leader_block_hook"):
        run_steps(model, FAMILIES["wan"], 4)
    handle.remove()
    # Removing BWCache gives enable_cache back.
    other = FAMILIES["wan"].build()
    with bwcache.cached(other):
        pass
    other.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    assert other.is_cache_enabled
    with pytest.raises(ValueError, match="FirstBlockCacheConfig"):
        apply_bwcache(other)


def test_the_context_manager_removes_the_cache_however_the_block_ends():
    model = DoublingTransformer(num_layers=3)
    reference = run_dummy(model, 6)
    with pytest.raises(RuntimeError, match="stop"):
        with bwcache.cached(model, BWCacheConfig(threshold=1.0, reuse_interval=1)) as handle:
            run_dummy(model, 6)
            assert bwcache.get_bwcache_handle(model) is handle
            raise RuntimeError("stop")
    assert bwcache.get_bwcache_handle(model) is None
    assert not any(block._diffusers_hook.hooks for block in model.blocks)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert handle.trace.reuse_fraction > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reference, run_dummy(model, 6)))


def test_a_config_step_count_that_disagrees_with_the_pipeline_names_both():
    pipe = build_wan_pipeline()
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.1, num_inference_steps=4)):
        with pytest.raises(ValueError, match=r"num_inference_steps=4\) disagrees with the steps run: the pipeline runs 6"):
            generate(pipe, steps=6)
    # Given the transformer alone, counting calls finds it out at the first step past the configured count.
    model = DoublingTransformer(num_layers=2)
    with bwcache.cached(model, BWCacheConfig(threshold=0.1, num_inference_steps=4)):
        with pytest.raises(ValueError, match=r"num_inference_steps=4\), but this generation runs more steps"):
            run_dummy(model, 6, context=None)


def test_the_pipeline_step_count_is_followed_from_call_to_call():
    pipe = build_wan_pipeline()
    with bwcache.cached(pipe, REUSE) as handle:
        generate(pipe, steps=6)
        assert [len(b["indicator"]) for b in handle.trace.to_dict()["branches"].values()] == [6, 6]
        generate(pipe, steps=4)
        branches = handle.trace.to_dict()["branches"]
    assert [len(b["indicator"]) for b in branches.values()] == [4, 4]
    assert ["r" if all(row) else "C" for row in branches["cond"]["reused"]] == list("CCrC")


def test_without_a_context_a_rising_timestep_starts_a_new_generation():
    """A transformer driven without cache contexts (and without a pipeline reset) still sees generations."""
    model = DoublingTransformer(num_layers=2)
    config = BWCacheConfig(threshold=1.0, reuse_interval=1, num_inference_steps=6)
    with bwcache.cached(model, config) as handle:
        # An aborted generation: 3 of 6 steps, no reset.
        for step in range(3):
            model(torch.full((1, 4, 8), 1.0 + step), timestep=torch.tensor([1000.0 - step]))
        fresh = [model(torch.full((1, 4, 8), 1.0 + s), timestep=torch.tensor([1000.0 - s]))[0] for s in range(6)]
        trace = handle.trace.to_dict()
    assert len(trace["branches"]["default"]["indicator"]) == 6
    model._reset_stateful_cache()
    with bwcache.cached(model, config):
        clean = [model(torch.full((1, 4, 8), 1.0 + s), timestep=torch.tensor([1000.0 - s]))[0] for s in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(fresh, clean))


def test_a_call_that_raises_drops_the_state():
    model = DoublingTransformer(num_layers=2)
    with bwcache.cached(model, BWCacheConfig(threshold=1.0, reuse_interval=1)) as handle:
        for step in range(3):
            step_dummy(model, step, 6)
        hook = handle._hook
        assert hook.states
        class OutOfMemory:
            def __sub__(self, other):
                raise RuntimeError("CUDA out of memory")

            __mul__ = __sub__

        with pytest.raises(RuntimeError, match="out of memory"):
            with model.cache_context("cond", step_index=3, num_inference_steps=6):
                model(OutOfMemory())
        assert not hook.states and hook.active is None


def test_remove_from_a_pipeline_and_from_its_transformer():
    pipe = build_wan_pipeline()
    apply_bwcache(pipe)
    remove_bwcache(pipe.transformer)
    with pytest.raises(ValueError, match="not applied"):
        remove_bwcache(pipe)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_configured_step_count_longer_than_the_run_is_refused_for_every_family(family):
    """Given the transformer alone with no context saying its step count, a run of 4 steps under a configured 6 is
    found out at the pipeline's end-of-call reset, and refused by name."""
    spec = FAMILIES[family]
    model = spec.build()
    with bwcache.cached(model, BWCacheConfig(threshold=0.1, num_inference_steps=6)):
        run_steps(model, spec, 4, context=False)
        with pytest.raises(ValueError, match=r"num_inference_steps=6\), but the generation that just ended ran 4 steps"):
            model._reset_stateful_cache()
        run_steps(model, spec, 6, context=False)
        model._reset_stateful_cache()  # the configured count: nothing to say


def test_a_second_order_scheduler_never_restarts_the_cache_mid_generation():
    """Heun calls the transformer twice at each timestep but the first: one generation, one step per call, on the
    stock pipeline (applied to it or to its transformer) and on a transformer driven with no context at all."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = build_wan_pipeline()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=5.0)
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps
    assert len(timesteps) == 7 and timesteps[1] == timesteps[2]
    plain = generate(pipe, steps=4)
    for target in (pipe, pipe.transformer):
        with bwcache.cached(target, BWCacheConfig(threshold=0.0, mode="blockwise")) as handle:
            assert (generate(pipe, steps=4) == plain).all()
            branches = handle.trace.to_dict()["branches"]
        assert [len(b["indicator"]) for b in branches.values()] == [7, 7]
        assert all(b["indicator"][0] is None and None not in b["indicator"][1:] for b in branches.values())
    model = DoublingTransformer(num_layers=2)
    with bwcache.cached(model, BWCacheConfig(threshold=0.0, num_inference_steps=7)) as handle:
        for i, t in enumerate(timesteps):
            model(torch.full((1, 4, 8), 1.0 + i), timestep=t.reshape(1))
        indicator = handle.trace.to_dict()["branches"]["default"]["indicator"]
    assert len(indicator) == 7 and None not in indicator[1:]


def test_the_cache_is_empty_before_the_pipeline_decodes():
    """What the cache holds goes at each branch's last step, so the VAE decodes with none of it alive."""
    pipe = build_wan_pipeline()
    held_at_decode = []
    decode = pipe.vae.decode

    def spy(*args, **kwargs):
        held_at_decode.append(sum(t.numel() for hook in handle.hooks for s in hook.states.values()
                                  for t in s.held_tensors()))
        return decode(*args, **kwargs)

    pipe.vae.decode = spy
    with bwcache.cached(pipe, BWCacheConfig(threshold=10.0, mode="blockwise", reuse_interval=2, warmup_steps=1,
                                            tail_steps=0, extrapolation=0.5)) as handle:
        generate(pipe)
        assert handle.trace.held_bytes_peak > 0 and handle.trace.reuse_fraction > 0
    assert held_at_decode == [0]
